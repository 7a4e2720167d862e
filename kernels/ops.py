"""The model's one entry point to fused ops: each function picks Triton or the torch
reference by the model's `kernels` switch.

    "torch"  -> always the reference (kernels/reference.py)
    "auto"   -> Triton on CUDA tensors (when triton imports), the reference elsewhere
    "triton" -> always Triton; on CPU that needs TRITON_INTERPRET=1 (set before triton is
                imported), which is how the tests run every kernel without a GPU
The numerics are the same either way: every Triton op is tested against its reference.
`interpreting`, `dot_precision` and `upcast_dot` are the switches the kernel files share.
"""
from __future__ import annotations

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
    if use_triton(mode, x):
        return _triton("swiglu").swiglu_linear(x, weight)
    return ref.swiglu_linear(x, weight)


def apply_rotary(x, cos, sin, mode="auto"):
    if use_triton(mode, x):
        return _triton("rotary").apply_rotary(x, cos, sin)
    return ref.apply_rotary(x, cos, sin)


def attention(q, k, v, prefix_lens=None, pad_lens=None, q_offset=0, mode="auto"):
    if use_triton(mode, q):
        return _triton("flash_attention").attention(q, k, v, prefix_lens, pad_lens, q_offset)
    return ref.attention(q, k, v, prefix_lens, pad_lens, q_offset)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, mode="auto"):
    if use_triton(mode, hidden):
        return _triton("cross_entropy").linear_cross_entropy(hidden, weight, labels,
                                                             ignore_index)
    return ref.linear_cross_entropy(hidden, weight, labels, ignore_index)
