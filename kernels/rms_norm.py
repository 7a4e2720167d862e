"""RMSNorm and the fused residual-add + RMSNorm, forward and backward.

Semantics are kernels.reference.rms_norm / add_rms_norm:
    y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)       statistics in fp32
    add_rms_norm(x, r) = (s, rms_norm(s)) with s = x + r        s rounded to its dtype first

Layout: every tensor is flattened to rows [M, N] (N = hidden). A program owns BLOCK_M
rows x the whole row (BLOCK_N = next_pow2(N) columns), so a row's statistics never leave
registers. The backward writes one fp32 partial dweight per program; torch sums them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops import gpu_target, interpreting


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _rms_norm_fwd(X, R, S, Y, W, RSTD, n_rows, n_cols, stride_x, stride_r, stride_s,
                  stride_y, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)  # row * stride overflows int32 past 2^31 elements
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # the sum is an output in its own dtype, and the norm sees that rounded value
        s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows64[:, None] * stride_s + cols[None, :], s, mask=mask)
        x = s
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)  # [BLOCK_M] fp32
    tl.store(RSTD + rows, rstd, mask=row_ok)
    # the reference rounds the normalised value to x's dtype before the weight multiply
    normed = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = normed * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty),
             mask=mask)


@triton.jit
def _rms_norm_bwd(DY, DS, X, W, RSTD, DX, DW_PART, n_rows, n_cols, rows_per_program,
                  stride_dy, stride_ds, stride_x, stride_dx, HAS_DS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dx = rstd * (dn - xhat * mean(dn * xhat)),  dn = dy * w,  xhat = x * rstd
    # dw = sum_rows dy * xhat (xhat rounded as in the forward)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x_raw = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        x = x_raw.to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        dw += tl.sum(dy * xhat.to(x_raw.dtype).to(tl.float32), axis=0)
        dn = dy * w[None, :]
        dot = tl.sum(dn * xhat, axis=1) / n_cols  # [BLOCK_M]
        dx = (dn - xhat * dot[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :],
                 dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_ok)


# --------------------------------------------------------------------------- launcher
def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n] -> [M, n] with unit column stride (a view when possible)."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _settings(n_cols: int, n_rows: int):
    block_n = triton.next_power_of_2(n_cols)
    if interpreting():
        # the interpreter pays per program, not per element: few large programs
        block_m = max(1, min(triton.next_power_of_2(n_rows), 16384 // block_n))
        return block_n, block_m, 1
    if block_n > 65536:
        raise ValueError(f"rms_norm: hidden size {n_cols} exceeds the 65536 one-row limit")
    block_m = max(1, min(16, 2048 // block_n))
    num_warps = 4 if block_n < 2048 else (8 if block_n < 8192 else 16)
    return block_n, block_m, num_warps


def _check(x: torch.Tensor, weight: torch.Tensor):
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match "
                         f"hidden size {x.shape[-1]}")


def _forward(x, residual, weight, eps):
    n = x.shape[-1]
    x2 = _rows(x, n)
    m = x2.shape[0]
    if residual is not None:
        r2 = _rows(residual, n)
        s2 = torch.empty((m, n), device=x.device, dtype=torch.promote_types(x.dtype,
                                                                            residual.dtype))
        norm_dtype = s2.dtype
    else:
        r2 = s2 = x2  # unused placeholders (HAS_RESIDUAL=False)
        norm_dtype = x.dtype
    y2 = torch.empty((m, n), device=x.device, dtype=torch.promote_types(weight.dtype,
                                                                        norm_dtype))
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    block_n, block_m, warps = _settings(n, m)
    _rms_norm_fwd[(triton.cdiv(m, block_m),)](
        x2, r2, s2, y2, weight, rstd, m, n, x2.stride(0), r2.stride(0), s2.stride(0),
        y2.stride(0), eps, HAS_RESIDUAL=residual is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=warps)
    return (s2 if residual is not None else None), y2, rstd


def _backward(dy, ds, xs, weight, rstd):
    """xs: the normalised input [M, N] (x, or the sum for add_rms_norm)."""
    m, n = xs.shape
    dy2 = _rows(dy, n)
    ds2 = _rows(ds, n) if ds is not None else dy2
    dx = torch.empty((m, n), device=xs.device, dtype=xs.dtype)
    if m == 0:
        return dx, torch.zeros_like(weight)
    block_n, block_m, warps = _settings(n, m)
    if interpreting():
        programs = 1
    else:
        sms = gpu_target(xs.device)[1]
        programs = min(4 * sms, triton.cdiv(m, block_m))
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    programs = triton.cdiv(m, rows_per_program)
    dw_part = torch.empty((programs, n), device=xs.device, dtype=torch.float32)
    _rms_norm_bwd[(programs,)](
        dy2, ds2, xs, weight, rstd, dx, dw_part, m, n, rows_per_program, dy2.stride(0),
        ds2.stride(0), xs.stride(0), dx.stride(0), HAS_DS=ds is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=warps)
    return dx, dw_part.sum(0).to(weight.dtype)


# --------------------------------------------------------------------------- autograd
class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        _check(x, weight)
        _, y2, rstd = _forward(x, None, weight, eps)
        ctx.save_for_backward(_rows(x, x.shape[-1]), weight, rstd)
        ctx.x_shape = x.shape
        return y2.view(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, None, x2, weight, rstd)
        return dx.view(ctx.x_shape), dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        _check(x, weight)
        if x.shape != residual.shape:
            raise ValueError(f"add_rms_norm: x shape {tuple(x.shape)} != residual shape "
                             f"{tuple(residual.shape)}")
        s2, y2, rstd = _forward(x, residual, weight, eps)
        ctx.save_for_backward(s2, weight, rstd)
        ctx.meta = (x.shape, x.dtype, residual.dtype)
        ctx.set_materialize_grads(False)
        return s2.view(x.shape), y2.view(x.shape)

    @staticmethod
    def backward(ctx, ds, dy):
        s2, weight, rstd = ctx.saved_tensors
        shape, x_dtype, r_dtype = ctx.meta
        if dy is None:  # only the sum was used: the norm contributes nothing
            if ds is None:
                return None, None, None, None
            return ds.to(x_dtype), ds.to(r_dtype), None, None
        dx, dw = _backward(dy, ds, s2, weight, rstd)  # d(sum) = ds + d(norm)/ds
        dx = dx.view(shape)
        return dx.to(x_dtype), dx.to(r_dtype), dw, None


# ------------------------------------------------------------------------ entry points
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + residual, rms_norm(x + residual)); gradients reach x, residual and weight."""
    return AddRMSNormFunction.apply(x, residual, weight, eps)
