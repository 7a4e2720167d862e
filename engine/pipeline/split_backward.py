"""Split backward for zero-bubble schedules: B computes input gradients only, W computes
the weight gradients of the same microbatch later, with no work done twice.

How: while a chunk's store defers (`store.backward_of(key)`, the B op), every nn.Linear
in it, and the local product of every tensor-parallel ColumnParallelLinear /
RowParallelLinear (their `_matmul`, see engine/tensor_parallel/layers.py), runs through
`_DeferredLinear`. Its backward computes dX = dY W (the part on the critical path,
needed by the previous stage) and, instead of dW = dY^T X and db = sum dY, stashes
(X, dY) in a `WeightGradStore` under the current microbatch; `store.run(key)` (the W op)
later computes those products and hands each one to autograd (`torch.autograd.backward`
on the leaf), so gradient accumulation, post-accumulate-grad hooks (the data-parallel
buckets) and fp16 scaling see exactly what a plain backward gives them. The autograd
graph is freed by B as usual: between B and W a linear layer keeps only its input and
its output gradient.

Tensor parallelism: the communication of a TP layer sits around its product (the input
map's all-gather / identity, the row layer's reduction), so B still runs every
collective and W runs none. Under sequence parallelism the X a column-parallel layer
stashes is the all-gathered full sequence [s, b, h], tp times its [s/tp, b, h] input,
held until W (the plain backward frees it at B). A column layer with `replica` set (GQA
KV rows shared by several TP ranks) stays on the plain path: the tensor it multiplies is
not its weight but a cat through copy_to_replicas, whose backward is an all-reduce over
the sharers, so its weight gradient only exists by running that graph (freed by B) and a
collective inside W.

Mixed precision: under autocast the product runs as autocast runs F.linear (floating
operands cast to the compute dtype), X is stashed in that dtype, and W multiplies in it
and casts the result to the parameter's dtype, the steps a plain autocast backward takes
(the product in the compute dtype, then the cast's backward), so the gradients are the
same. With fp16 loss scaling dY carries the scale, and so does W's gradient.

What stays in B:
  norms       their weight gradient is an elementwise product summed over rows, cheap
              and computed with dX by the norm's own backward; splitting it would save
              little work and hold the normalised input until W.
  embeddings  the weight gradient is a scatter-add of dY into the table rows, memory
              work rather than a matmul, and dY would have to be held for it.
  output head its weight gradient is computed inside the fused linear cross-entropy
              (kernels/cross_entropy.py, vocab-parallel under TP), which never forms the
              [N, V] logit gradient; deferring it would need that gradient held until W
              or the logits recomputed there.
  row biases  (RowParallelLinear adds its bias after the reduction) a sum of dY, in B.

This differs from torch.distributed.pipelining's stage_backward_input/weight, which
retain the autograd graph between the two passes, and is closer to Megatron/ZB's
WeightGradStore (which intercepts their own linear layers).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from kernels.ops import autocast_dtype


class WeightGradStore:
    """(X, dY) pairs per microbatch key, waiting for their W."""

    def __init__(self, meter=None):
        self.pending: dict = defaultdict(list)   # key -> [(weight, bias, x, dy)]
        self.key = None        # the microbatch whose backward is running (None: no defer)
        self.meter = meter     # SavedActivationMeter: counts the bytes held until W

    def put(self, weight, bias, x, dy):
        self.pending[self.key].append((weight, bias, x, dy))
        if self.meter is not None:
            self.meter.add(_nbytes(x) + _nbytes(dy))

    @contextlib.contextmanager
    def backward_of(self, key):
        """B: linear layers inside stash their weight gradients under `key`."""
        previous, self.key = self.key, key
        try:
            yield
        finally:
            self.key = previous

    def run(self, key):
        """W: the weight gradients of every linear layer of microbatch `key`, in the order
        the backward produced them (the order a plain backward accumulates them in)."""
        for weight, bias, x, dy in self.pending.pop(key, []):
            grads, leaves = _weight_grads(weight, bias, x, dy)
            if leaves:
                torch.autograd.backward(leaves, grad_tensors=grads)
            if self.meter is not None:
                self.meter.add(-(_nbytes(x) + _nbytes(dy)))

    def __len__(self):
        return sum(len(v) for v in self.pending.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _weight_grads(weight, bias, x, dy):
    """(grads, leaves) of a stashed product: dW = dY^T X, db = sum dY, computed in the
    dtype of x and dy (autocast's compute dtype when the forward ran under it, with
    autocast off here so that nothing recasts them) and cast to the parameter's dtype,
    as the backward of autocast's cast would."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    grads, leaves = [], []
    with torch.autocast(x.device.type, enabled=False):
        if weight.requires_grad:
            grads.append(dy2.t().mm(x2).to(weight.dtype))
            leaves.append(weight)
        if bias is not None and bias.requires_grad:
            grads.append(dy2.sum(0).to(bias.dtype))
            leaves.append(bias)
    return grads, leaves


class _DeferredLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) whose weight and bias gradients go to the store while
    it defers (store.key set), else come at once like F.linear's."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.store = store
        # the Parameters themselves (save_for_backward keeps values, and under autocast
        # the values saved are casts): W accumulates into these
        ctx.weight_param, ctx.bias_param = weight, bias
        dtype = autocast_dtype(x)
        if dtype is not None:
            # autocast's F.linear: every floating operand in the compute dtype. Done by
            # hand because backward runs outside autocast: saving the casts makes B and W
            # multiply in the forward's dtype whatever autocast state they run under
            x, weight, bias = (t.to(dtype) if t is not None and t.is_floating_point()
                               and t.dtype != torch.float64 else t for t in (x, weight, bias))
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        store = ctx.store
        with torch.autocast(dy.device.type, enabled=False):
            # in the compute dtype under autocast; autograd casts each gradient to its
            # input's dtype, as the backward of autocast's casts does
            dx = dy.matmul(weight) if ctx.needs_input_grad[0] else None
            if store.key is not None:
                if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:   # frozen: nothing
                    store.put(ctx.weight_param, ctx.bias_param, x, dy)
                return dx, None, None, None
            # not deferring (e.g. a plain backward through a deferring chunk): do it now
            dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
            dw = dy2.t().mm(x2) if ctx.needs_input_grad[1] else None
            db = dy2.sum(0) if ctx.bias_param is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def _deferring_product(store: WeightGradStore):
    """F.linear's signature, through the deferring Function when a backward will run."""
    def product(x, weight, bias=None):
        if not torch.is_grad_enabled():
            return F.linear(x, weight, bias)
        return _DeferredLinear.apply(x, weight, bias, store)
    return product


def _linear_forward(module: nn.Linear, store: WeightGradStore):
    product = _deferring_product(store)

    def forward(x):
        return product(x, module.weight, module.bias)
    return forward


def _mlp_forward(mlp):
    from kernels import ops

    def forward(x):
        return mlp.down(ops.swiglu(mlp.gate_up(x), mlp.config.kernels))
    return forward


def _tp_product(module) -> bool:
    """A tensor-parallel column / row layer whose product may defer: it has the
    `_matmul` hook (engine/tensor_parallel/layers.py; duck-typed, engine.pipeline does not
    import engine.tensor_parallel) and no `replica` (see the module docstring: a shared
    KV copy's weight reaches the product through copy_to_replicas)."""
    return callable(getattr(type(module), "_matmul", None)) and \
        getattr(module, "replica", None) is None


def install(chunk: nn.Module, store: WeightGradStore) -> int:
    """Route every nn.Linear of `chunk`, and the product of every deferrable
    tensor-parallel layer, through the deferring Function (idempotent); returns how many
    layers are routed. Plain backwards through them (store.key None) still compute weight
    gradients at once, so an installed chunk stays usable by the other schedules."""
    n = 0
    for module in chunk.modules():
        gate_up = getattr(module, "gate_up", None)
        if (gate_up is not None and (type(gate_up) is nn.Linear or _tp_product(gate_up))
                and gate_up.bias is None and hasattr(module, "down")
                and getattr(module, "_weight_grad_store", None) is not store):
            # model.attention.MLP hands gate_up's weight (and a TP gate_up's mapped input)
            # to the fused swiglu_linear, which bypasses gate_up.forward; route it through
            # the layer (swiglu_linear is swiglu(linear(x, w)) on the torch path, and casts
            # under autocast as the Function does, so the values are the same)
            module._weight_grad_store = store
            module.forward = _mlp_forward(module)
        if type(module) is nn.Linear:
            if getattr(module, "_weight_grad_store", None) is not store:
                module._weight_grad_store = store
                module.forward = _linear_forward(module, store)
            n += 1
        elif _tp_product(module):
            if getattr(module, "_weight_grad_store", None) is not store:
                module._weight_grad_store = store
                module._matmul = _deferring_product(store)   # the instance's, not the class's
            n += 1
    return n


def store_for(chunk: nn.Module) -> WeightGradStore:
    """The chunk's store, installed on first use."""
    store = getattr(chunk, "_weight_grad_store", None)
    if store is None:
        store = WeightGradStore()
        install(chunk, store)
        chunk._weight_grad_store = store
    return store
