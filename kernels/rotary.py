"""Rotary embedding on adjacent pairs, forward and backward (semantics:
kernels.reference.apply_rotary).

    out[2i]   = x[2i] * cos[i] - x[2i+1] * sin[i]
    out[2i+1] = x[2i+1] * cos[i] + x[2i] * sin[i]          computed in fp32

cos/sin [..., d/2] broadcast against x [..., d] exactly as in torch; GLM's 2D rotary is
only a different angle layout (kernels.reference.rotary_angles), so it needs nothing here.
Broadcasting costs no memory: up to four leading dims are walked with their own strides
(a broadcast dim has stride 0), so the model's cos [s, b, 1, d/2] is read once per head
without being expanded, and q/k are read straight out of the fused QKV output (strided
views, no copy). The backward is the rotation by -angle: the same kernel with sin negated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops import interpreting


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _rotary(X, COS, SIN, OUT, n_rows, half, L1, L2, L3,
            sx0, sx1, sx2, sx3, sc0, sc1, sc2, sc3, ss0, ss1, ss2, ss3,
            NEGATE_SIN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pairs = tl.arange(0, BLOCK_P)
    mask = (rows < n_rows)[:, None] & (pairs < half)[None, :]
    # row -> (i0, i1, i2, i3) over the leading dims [L0, L1, L2, L3]
    r = rows.to(tl.int64)
    i3 = r % L3
    r = r // L3
    i2 = r % L2
    r = r // L2
    i1 = r % L1
    i0 = r // L1
    x_row = i0 * sx0 + i1 * sx1 + i2 * sx2 + i3 * sx3
    c_row = i0 * sc0 + i1 * sc1 + i2 * sc2 + i3 * sc3
    s_row = i0 * ss0 + i1 * ss1 + i2 * ss2 + i3 * ss3
    x_ptr = X + x_row[:, None] + 2 * pairs[None, :]
    x0 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + 1, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(COS + c_row[:, None] + pairs[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + s_row[:, None] + pairs[None, :], mask=mask, other=0.0).to(tl.float32)
    if NEGATE_SIN:
        s = -s
    o_ptr = OUT + rows.to(tl.int64)[:, None] * (2 * half) + 2 * pairs[None, :]
    tl.store(o_ptr, (x0 * c - x1 * s).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + 1, (x1 * c + x0 * s).to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launcher
def _dims4(t: torch.Tensor):
    """Sizes and strides of t's leading dims (all but the last), padded in front to 4."""
    sizes, strides = list(t.shape[:-1]), list(t.stride()[:-1])
    pad = 4 - len(sizes)
    return [1] * pad + sizes, [0] * pad + strides


def _prepare(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Validate, and bring x / cos / sin to <= 4 leading dims with unit last stride."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"apply_rotary: last dim {d} must be even (adjacent pairs)")
    lead, half = tuple(x.shape[:-1]), d // 2
    target = lead + (half,)
    try:
        cos_b, sin_b = (t.broadcast_to(target) for t in (cos, sin))
    except RuntimeError:
        raise ValueError(f"apply_rotary: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} "
                         f"do not broadcast to {target}") from None
    if len(lead) > 4:  # rare: fold the extra dims (copies the expanded angles)
        x = x.reshape(-1, *lead[-3:], d)
        cos_b, sin_b = (t.reshape(-1, *lead[-3:], half) for t in (cos_b, sin_b))
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos_b, sin_b = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos_b, sin_b))
    return x, cos_b, sin_b


def _launch(x, cos_b, sin_b, negate_sin: bool) -> torch.Tensor:
    d = x.shape[-1]
    half = d // 2
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    n_rows = out.numel() // d
    if n_rows == 0:
        return out
    sizes, sx = _dims4(x)
    _, sc = _dims4(cos_b)
    _, ss = _dims4(sin_b)
    block_p = triton.next_power_of_2(half)
    if interpreting():
        block_r = max(1, min(triton.next_power_of_2(n_rows), 16384 // block_p))
    else:
        block_r = max(1, 4096 // block_p)
    _rotary[(triton.cdiv(n_rows, block_r),)](
        x, cos_b, sin_b, out, n_rows, half, sizes[1], sizes[2], sizes[3], *sx, *sc, *ss,
        NEGATE_SIN=negate_sin, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=4)
    return out


# --------------------------------------------------------------------------- autograd
class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        shape = x.shape
        x, cos_b, sin_b = _prepare(x, cos, sin)
        ctx.save_for_backward(cos_b, sin_b)
        ctx.shape = shape
        return _launch(x, cos_b, sin_b, negate_sin=False).view(shape)

    @staticmethod
    def backward(ctx, dy):
        cos_b, sin_b = ctx.saved_tensors
        dy = dy.reshape(-1, *cos_b.shape[1:-1], dy.shape[-1]) if dy.dim() > 5 else dy
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        # a rotation's transpose is the rotation by -angle
        return _launch(dy, cos_b, sin_b, negate_sin=True).view(ctx.shape), None, None


# ------------------------------------------------------------------------ entry points
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., d]; cos/sin broadcast to [..., d/2]. Returns x's dtype and shape.
    cos/sin are constants of the positions: no gradient flows to them."""
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("apply_rotary: cos/sin require grad, but the Triton rotary treats "
                         "them as constants (use kernels='torch' to differentiate angles)")
    return RotaryFunction.apply(x, cos, sin)
