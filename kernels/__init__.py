"""Fused ops. `kernels.ops` is the only module the model imports: it dispatches each op to
its Triton implementation or to the torch reference in `kernels.reference`."""
