"""Split backward for zero-bubble schedules: B computes input gradients only, W computes
the weight gradients of the same microbatch later, with no work done twice.

How: while a chunk's store records (`store.deferring()` around the forward, the F op of
a split schedule), every nn.Linear in it, and the local product of every
tensor-parallel ColumnParallelLinear / RowParallelLinear (their `_matmul`, see
engine/tensor_parallel/layers.py), multiplies by its weight *detached* and hooks its
output: autograd then never forms dW = dY^T X or db = sum dY, and B (the chunk's plain
autograd backward under `store.backward_of(key)`) computes dX = dY W and everything else
as usual, while each hook stashes (X, dY) in a `WeightGradStore` under the microbatch.
`store.run(key)` (the W op) later computes those products, each GEMM adding straight
into the gradient's home: the data-parallel bucket slot, or .grad (Megatron's
gradient-accumulation fusion; equal to a plain backward's gradients to fp32 rounding). With
`store.fuse_accumulation = False` it hands them to autograd in one call instead, so that
accumulation, post-accumulate-grad hooks and fp16 scaling see bit for bit what a plain
backward gives them. The autograd graph is freed by B as usual: between B and W a
linear layer keeps only its input and its output gradient.

Why a detached weight and a tensor hook rather than a custom autograd.Function: the
product and its backward stay autograd's own C++ nodes, so on CPU a deferred layer costs
what a plain one does (a Python Function per layer cost ~10% of a small stage's F+B+W),
and reentrant recomputation (engine/train/recompute.py) replays through it unchanged.
Outside `deferring()` and `backward_of()` an installed chunk multiplies as F.linear
does, so it stays usable by every other schedule.

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

from engine.optim.grad_buckets import grad_sink
from kernels.ops import autocast_dtype


class WeightGradStore:
    """(X, dY) pairs per microbatch key, waiting for their W."""

    def __init__(self, meter=None):
        self.pending: dict = defaultdict(list)   # key -> [(weight, bias, x, dy)]
        self.key = None        # the microbatch whose backward is running (None: no defer)
        self.armed = False     # forwards record their products for a later W
        self.meter = meter     # SavedActivationMeter: counts the bytes held until W
        self._held: dict = defaultdict(list)     # key -> the meter's holders of the X's
        self.fuse_accumulation = True   # W's GEMM adds into the gradient (see run)

    def recording(self) -> bool:
        return self.armed or self.key is not None

    def put(self, weight, bias, x, dy, held=None):
        self.pending[self.key].append((weight, bias, x, dy))
        if self.meter is not None:
            # X has been counted since the forward, through its holder (one count per
            # storage, shared with whatever else saved it); dY is new
            self.meter.add(_nbytes(dy))
            self._held[self.key].append(held)

    @contextlib.contextmanager
    def deferring(self):
        """F: products of linear layers inside leave their weight gradients to W."""
        previous, self.armed = self.armed, True
        try:
            yield
        finally:
            self.armed = previous

    @contextlib.contextmanager
    def backward_of(self, key):
        """B: linear layers inside stash their weight gradients under `key` (a forward
        run inside, e.g. a recomputed one, records as under deferring())."""
        previous, self.key = self.key, key
        try:
            yield
        finally:
            self.key = previous

    def run(self, key):
        """W: the weight gradients of every linear layer of microbatch `key`.

        Fused (the default): each dW = dY^T X is one GEMM that adds into the gradient's
        home in place (`addmm_`, beta 1): the parameter's data-parallel bucket slot when a
        GradBuckets holds it (engine/optim/grad_buckets.py: grad_sink), else .grad; the
        first microbatch's product is .grad itself, as autograd would store it. That is
        one pass over dW fewer than a product, then autograd's accumulation, then the
        bucket hook's add (on this CPU ~20% less time in W). The sum rounds as a GEMM
        with beta 1 rounds, so from the second microbatch on the gradients equal a plain
        backward's to fp32 rounding (bit for bit on this CPU's BLAS up to 256 rows a
        microbatch, not in general). A parameter with a tensor hook, or a
        post-accumulate-grad hook that is not its bucket's, goes through autograd.

        Exact (fuse_accumulation False): the products are handed to autograd in one call
        (one engine run, not one per layer: on CPU each call costs about as much as a
        small layer's product), and every gradient is a plain backward's bit for bit. A
        parameter stashed twice (a layer applied twice) gets its products summed in
        backward order before they reach .grad, as a plain backward's input buffer sums
        them."""
        pending = self.pending.pop(key, [])
        grads, leaves = [], []
        for weight, bias, x, dy in pending:
            g, ls = (_accumulate_fused(weight, bias, x, dy) if self.fuse_accumulation
                     else _weight_grads(weight, bias, x, dy))
            grads += g
            leaves += ls
            if self.meter is not None:
                self.meter.add(-_nbytes(dy))
        self._held.pop(key, None)   # the X's holders: released from the meter
        if leaves:
            torch.autograd.backward(leaves, grad_tensors=grads)

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
    with _no_autocast(x):
        if weight.requires_grad:
            grads.append(dy2.t().mm(x2).to(weight.dtype))
            leaves.append(weight)
        if bias is not None and bias.requires_grad:
            grads.append(dy2.sum(0).to(bias.dtype))
            leaves.append(bias)
    return grads, leaves


def _accumulate_fused(weight, bias, x, dy):
    """W's fused path for one stashed product (WeightGradStore.run); returns the
    (grads, leaves) that must still go through autograd (parameters with hooks)."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    grads, leaves = [], []
    with torch.no_grad(), _no_autocast(x):
        if weight.requires_grad and not _add_into(weight, dy2.t(), x2):
            grads.append(dy2.t().mm(x2).to(weight.dtype))
            leaves.append(weight)
        if bias is not None and bias.requires_grad and not _add_into(bias, dy2, None):
            grads.append(dy2.sum(0).to(bias.dtype))
            leaves.append(bias)
    return grads, leaves


_UNKNOWN = object()


def _add_into(p, a, b) -> bool:
    """p's gradient += a @ b (b None: += the row sum of a), in its bucket slot or .grad;
    False (nothing done) when p has a hook that autograd must run."""
    sink = grad_sink(p)
    # torch keeps a tensor's hooks in these (private) attributes, None when there are
    # none; a torch without them is treated as hooked, so that no hook is ever skipped
    pre = getattr(p, "_backward_hooks", _UNKNOWN)
    post = getattr(p, "_post_accumulate_grad_hooks", _UNKNOWN)
    if pre is _UNKNOWN or post is _UNKNOWN or pre or len(post or ()) > (sink is not None) \
            or (sink is not None and p.grad is not None):
        return False
    if sink is None and p.grad is None:   # the first product: it becomes .grad
        p.grad = (a.mm(b) if b is not None else a.sum(0)).to(p.dtype)
        return True
    target = sink.view() if sink is not None else p.grad
    if b is not None and target.dtype == a.dtype:
        target.addmm_(a, b)
    else:   # a bias, or a product in autocast's dtype into an fp32 gradient
        target.add_(a.mm(b) if b is not None else a.sum(0))
    if sink is not None:
        sink.accumulated()
    return True


_NULL = contextlib.nullcontext()


def _no_autocast(t: torch.Tensor):
    """Autocast off around a product, entered only when it is on (a Python context per
    layer and pass is a measurable share of a small layer's time on CPU)."""
    return (torch.autocast(t.device.type, enabled=False)
            if autocast_dtype(t) is not None else _NULL)


def _deferring_product(store: WeightGradStore):
    """F.linear's signature; while the store records, the weight's gradient is left to
    W (module docstring)."""
    def product(x, weight, bias=None):
        wants = weight.requires_grad or (bias is not None and bias.requires_grad)
        if not (wants and store.recording() and torch.is_grad_enabled() and x.requires_grad):
            # nothing to defer, or no graph through x to hook (a frozen embedding's
            # output): the plain product, whose backward computes dW in B
            return F.linear(x, weight, bias)
        w, b = weight.detach(), None if bias is None else bias.detach()
        dtype = autocast_dtype(x)
        if dtype is not None:
            # autocast's F.linear: every floating operand in the compute dtype. By hand,
            # so that the X W multiplies is that very tensor (held once, in that dtype)
            # and the bias add of the folded path below stays in it
            x, w, b = (t.to(dtype) if t is not None and t.is_floating_point()
                       and t.dtype != torch.float64 else t for t in (x, w, b))
        y, x = _linear_as_plain(x, w, b)
        # autograd saves only the weight for dX; X stays alive through the hook, so the
        # meter (if any) counts it from here
        held = store.meter.hold(x) if store.meter is not None else None
        y.register_hook(_Stash(store, weight, bias, x, held))
        return y
    return product


def _linear_as_plain(x, weight, bias):
    """F.linear by a weight that does not require grad, computed by the kernels F.linear
    picks when it does, so that the values are the plain product's bit for bit: with a
    weight that requires grad, matmul folds x's leading dimensions into one mm (copying
    x if they are not contiguous); without, it may take a batched path instead. F.linear's
    own fused addmm (2-D x, or 3-D contiguous x with a bias) does not depend on it.
    Returns (y, the x multiplied: the folded copy when there is one, which W reuses)."""
    if x.dim() <= 2 or (bias is not None and x.dim() == 3 and x.is_contiguous()):
        return F.linear(x, weight, bias), x
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(x2, weight).view(*x.shape[:-1], weight.shape[0])
    return (y if bias is None else y + bias), x2


class _Stash:
    """The hook on a deferred product's output: dY arrives in B and goes to the store
    with the product's X."""
    __slots__ = ("store", "weight", "bias", "x", "held")

    def __init__(self, store, weight, bias, x, held):
        self.store, self.weight, self.bias, self.x, self.held = store, weight, bias, x, held

    def __call__(self, dy):
        if self.store.key is None:
            raise RuntimeError("a linear layer recorded under WeightGradStore.deferring() "
                               "ran its backward outside backward_of(key): its weight "
                               "gradient would never be computed")
        self.store.put(self.weight, self.bias, self.x, dy, self.held)


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
