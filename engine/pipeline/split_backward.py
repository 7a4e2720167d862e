"""Split backward for zero-bubble schedules: B computes input gradients only, W computes
the weight gradients of the same microbatch later, with no work done twice.

How: while a chunk is `deferring(...)`, every nn.Linear in it runs through
`_DeferredLinear`. Its backward computes dX = dY W (the part on the critical path, needed
by the previous stage) and, instead of dW = dY^T X and db = sum dY, stashes (X, dY) in a
`WeightGradStore` under the current microbatch; `store.run(key)` (the W op) later computes
those products and hands each one to autograd (`torch.autograd.backward` on the leaf), so
gradient accumulation, post-accumulate-grad hooks (the data-parallel buckets) and fp16
scaling see exactly what a plain backward gives them. The autograd graph is freed by B as
usual: between B and W a linear layer keeps only its input and its output gradient.
Other parameters (norms, embeddings: a small share of the work) get their gradients in B.

This differs from torch.distributed.pipelining's stage_backward_input/weight, which
retain the autograd graph between the two passes, and is closer to Megatron/ZB's
WeightGradStore (which intercepts their own linear layers); it is written for the
nn.Linear layers of model/ (tensor-parallel layers, and the output layer whose weight the
fused loss reads directly, keep the plain backward: their weight gradients come in B).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn


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
            x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
            grads, leaves = [dy2.t().mm(x2)], [weight]
            if bias is not None and bias.requires_grad:
                grads.append(dy2.sum(0))
                leaves.append(bias)
            if not weight.requires_grad:
                grads, leaves = grads[1:], leaves[1:]
            if leaves:
                torch.autograd.backward(leaves, grad_tensors=grads)
            if self.meter is not None:
                self.meter.add(-(_nbytes(x) + _nbytes(dy)))

    def __len__(self):
        return sum(len(v) for v in self.pending.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _DeferredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.store = store
        ctx.has_bias = bias is not None
        # the Parameter itself (save_for_backward keeps values): W accumulates into it
        ctx.bias_param = bias
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        store = ctx.store
        dx = dy.matmul(weight) if ctx.needs_input_grad[0] else None
        if store.key is not None:
            store.put(weight, ctx.bias_param, x, dy)
            return dx, None, None, None
        # not deferring (e.g. a plain backward through a deferring chunk): do it now
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dw = dy2.t().mm(x2) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def _linear_forward(module: nn.Linear, store: WeightGradStore):
    def forward(x):
        if not torch.is_grad_enabled():
            return F.linear(x, module.weight, module.bias)
        return _DeferredLinear.apply(x, module.weight, module.bias, store)
    return forward


def _mlp_forward(mlp):
    from kernels import ops

    def forward(x):
        return mlp.down(ops.swiglu(mlp.gate_up(x), mlp.config.kernels))
    return forward


def install(chunk: nn.Module, store: WeightGradStore) -> int:
    """Route every nn.Linear of `chunk` through the deferring Function (idempotent);
    returns how many layers are routed. Plain backwards through them (store.key None)
    still compute weight gradients at once, so an installed chunk stays usable by the
    other schedules."""
    n = 0
    for module in chunk.modules():
        gate_up = getattr(module, "gate_up", None)
        if (type(gate_up) is nn.Linear and gate_up.bias is None and hasattr(module, "down")
                and getattr(module, "_weight_grad_store", None) is not store):
            # model.attention.MLP hands gate_up's weight to the fused swiglu_linear, which
            # bypasses gate_up.forward; route it through the layer (swiglu_linear is
            # swiglu(linear(x, w)) on the torch path, so the values are the same)
            module._weight_grad_store = store
            module.forward = _mlp_forward(module)
        if type(module) is nn.Linear:
            if getattr(module, "_weight_grad_store", None) is not store:
                module._weight_grad_store = store
                module.forward = _linear_forward(module, store)
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
