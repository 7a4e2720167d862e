"""The model's one entry point to fused ops: each function picks Triton or the torch
reference by the model's `kernels` switch.

    "torch"  -> always the reference (kernels/reference.py)
    "auto"   -> Triton on CUDA tensors (when triton imports), the reference elsewhere
    "triton" -> always Triton; on CPU that needs TRITON_INTERPRET=1 (set before triton is
                imported), which is how the tests run every kernel without a GPU
The numerics are the same either way: every Triton op is tested against its reference.
`interpreting`, `dot_precision` and `upcast_dot` are the switches the kernel files share.

Autocast: the ops with matmuls inside (swiglu_linear, linear_cross_entropy, attention)
follow it like F.linear does. Under autocast their floating operands are cast here, at the
dispatch point, to autocast's dtype (gradients flow back through the casts to fp32
parameters), so every matmul inside runs in that dtype with fp32 accumulation; a Triton
op then runs with autocast off, so its backward (which runs outside autocast) recomputes
with exactly its forward's dtypes. Without autocast nothing is cast.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

from kernels import reference as ref


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (tests). Kernels then take one
    block config (autotune needs real hardware) and few, large programs (~3 ms each)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: fp32 operands follow torch's own TF32 switch so that a
    Triton matmul and the torch reference agree on CUDA ("ieee" = true fp32, the torch
    default); 16-bit operands ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 arithmetic and bf16 tl.dot are wrong: there, kernels cast bf16
    tiles to fp32 before dots. On GPUs bf16 dots are native."""
    return interpreting() and dtype == torch.bfloat16


_planned_target: tuple[int, int] | None = None  # set only by planning_for()


def gpu_target(device: torch.device) -> tuple[int, int]:
    """(compute capability as 80 / 90 / ..., SM count) of the GPU a launch goes to: the
    key of the launchers' tile tables."""
    if _planned_target is not None:
        return _planned_target
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_target(index)


@functools.lru_cache(maxsize=None)
def _device_target(index: int) -> tuple[int, int]:
    p = torch.cuda.get_device_properties(index)
    return p.major * 10 + p.minor, p.multi_processor_count


@contextlib.contextmanager
def planning_for(arch: int, sms: int):
    """Launchers pick tiles for this GPU whatever device their tensors are on (the
    ahead-of-time check, kernels/aot_check.py, plans launches on meta tensors)."""
    global _planned_target
    saved, _planned_target = _planned_target, (arch, sms)
    try:
        yield
    finally:
        _planned_target = saved


def use_triton(mode: str, x: torch.Tensor) -> bool:
    if mode == "torch":
        return False
    if mode == "triton":
        if not (x.is_cuda or interpreting()):
            raise RuntimeError("kernels='triton' needs a CUDA tensor or TRITON_INTERPRET=1 "
                               f"(got a {x.device.type} tensor)")
        return True
    if not x.is_cuda:
        return False
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls on x's device in, or None outside autocast."""
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _autocast_cast(dtype, *tensors):
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int, who: str):
    """Every label is ignore_index or in [0, vocab): an out-of-range gather reads garbage.
    On CPU a ValueError names the label; on a GPU the check runs on the device
    (torch._assert_async) so that the training step never waits for the host."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"{who}: label {labels[bad][0].item()} is outside [0, {vocab}) "
                             f"and is not ignore_index={ignore_index}")
        return
    torch._assert_async(~bad.any(), f"{who}: a label is outside [0, {vocab}) and is not "
                        f"ignore_index={ignore_index}")


def _triton(module: str):
    return importlib.import_module(f"kernels.{module}")


def rms_norm(x, weight, eps, mode="auto"):
    if use_triton(mode, x):
        return _triton("rms_norm").rms_norm(x, weight, eps)
    return ref.rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps, mode="auto"):
    if use_triton(mode, x):
        return _triton("rms_norm").add_rms_norm(x, residual, weight, eps)
    return ref.add_rms_norm(x, residual, weight, eps)


def swiglu(x, mode="auto"):
    """silu(gate) * up for x [..., 2f] = [gate | up] (the MLP's path when it has a bias)."""
    if use_triton(mode, x):
        return _triton("swiglu").swiglu(x)
    return ref.swiglu(x)


def swiglu_linear(x, weight, mode="auto"):
    dtype = autocast_dtype(x)
    if dtype is not None:  # e.g. add_rms_norm's fp32 `normed` and the fp32 weight
        x, weight = _autocast_cast(dtype, x, weight)
    if use_triton(mode, x):
        with torch.autocast(x.device.type, enabled=False):
            return _triton("swiglu").swiglu_linear(x, weight)
    return ref.swiglu_linear(x, weight)


def apply_rotary(x, cos, sin, mode="auto"):
    if use_triton(mode, x):
        return _triton("rotary").apply_rotary(x, cos, sin)
    return ref.apply_rotary(x, cos, sin)


def attention(q, k, v, prefix_lens=None, pad_lens=None, q_offset=0, mode="auto",
              doc_starts=None):
    dtype = autocast_dtype(q)
    if dtype is not None:  # e.g. an fp32 KV cache under autocast
        q, k, v = _autocast_cast(dtype, q, k, v)
    if use_triton(mode, q):
        with torch.autocast(q.device.type, enabled=False):
            return _triton("flash_attention").attention(q, k, v, prefix_lens, pad_lens,
                                                        q_offset, doc_starts=doc_starts)
    return ref.attention(q, k, v, prefix_lens, pad_lens, q_offset, doc_starts)


def at_labelled(loss_fn, hidden, labels, ignore_index=-100):
    """Run a per-token head + loss `loss_fn(hidden [n, h], labels [n]) -> [n]` only on the
    rows of hidden [N, h] whose label is not ignore_index, and scatter the result back into
    a [N] fp32 loss (0 elsewhere, as the loss there would be, and with zero gradient).

    A translation batch labels only its targets: the prompt rows would pay the [N, V]
    head matmuls (forward, backward and the fused kernel's recompute) for nothing. The
    row count is data-dependent, so on a GPU `nonzero` costs one host sync per call."""
    keep = (labels != ignore_index).nonzero().squeeze(1)
    if keep.numel() == labels.numel():
        return loss_fn(hidden, labels)
    loss = loss_fn(hidden.index_select(0, keep), labels.index_select(0, keep))
    return loss.new_zeros(labels.shape[0]).index_copy(0, keep, loss)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, mode="auto"):
    """Per-token loss [N] fp32; the head runs only at labelled rows (`at_labelled`)."""
    dtype = autocast_dtype(hidden)
    if dtype is not None:
        hidden, weight = _autocast_cast(dtype, hidden, weight)
    if use_triton(mode, hidden):
        def fn(h, y):
            # autocast off: the backward's logits recompute must see the forward's dtypes
            with torch.autocast(h.device.type, enabled=False):
                return _triton("cross_entropy").linear_cross_entropy(h, weight, y,
                                                                     ignore_index)
    else:
        def fn(h, y):
            return ref.linear_cross_entropy(h, weight, y, ignore_index)
    return at_labelled(fn, hidden, labels, ignore_index)
