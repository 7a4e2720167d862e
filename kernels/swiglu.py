"""SwiGLU, two ways (semantics: kernels.reference.swiglu / swiglu_linear).

(a) `swiglu(x)`: elementwise silu(gate) * up over x [..., 2f] laid out [gate | up]. The
    backward recomputes sigmoid(gate) from the saved input instead of storing silu.
(b) `swiglu_linear(x, weight)`: one matmul x [M, h] @ weight [2f, h]^T whose epilogue
    applies SwiGLU, so the [M, 2f] gate/up intermediate is never written. Each program
    keeps two fp32 accumulators, one for a gate tile (weight rows n..n+BN) and one for the
    matching up tile (rows f+n..f+n+BN). Only x is saved for backward; the backward reruns
    the same matmul over token chunks with an epilogue that turns dy into d[gate | up]
    (one [chunk, 2f] buffer at a time), then dx = dgu @ W and dW += dgu^T @ x on cuBLAS.

Derivatives, with s = sigmoid(g):  d/dg silu(g) * u = u * s * (1 + g * (1 - s)),
                                   d/du silu(g) * u = g * s.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.chunked_linear import chunked_linear_backward
from kernels.ops import dot_precision, gpu_target, interpreting, upcast_dot


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _swiglu_fwd(X, Y, n_rows, f, stride_x, stride_y, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < f)[None, :]
    rows64 = rows.to(tl.int64)
    g = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    u = tl.load(X + rows64[:, None] * stride_x + f + cols[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32)
    y = g * tl.sigmoid(g) * u.to(tl.float32)
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty),
             mask=mask)


@triton.jit
def _swiglu_bwd(X, DY, DX, n_rows, f, stride_x, stride_dy, stride_dx, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < f)[None, :]
    rows64 = rows.to(tl.int64)
    g = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    u = tl.load(X + rows64[:, None] * stride_x + f + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)  # recomputed: cheaper than a stored [M, f] silu
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * g * sig
    tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dg.to(DX.dtype.element_ty),
             mask=mask)
    tl.store(DX + rows64[:, None] * stride_dx + f + cols[None, :], du.to(DX.dtype.element_ty),
             mask=mask)


@triton.jit
def _swiglu_matmul(X, W, OUT, DY, M, f, K, stride_xm, stride_xk, stride_wn, stride_wk,
                   stride_om, stride_dym, BACKWARD: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """gate/up tiles of x @ W^T, then
       forward : OUT[m, n] = silu(gate) * up                      OUT [M, f]
       backward: OUT[m, n], OUT[m, f + n] = d gate, d up from DY   OUT [M, 2f]"""
    # grouped launch order: GROUP_M row blocks share weight tiles while they sit in L2
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(f, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % group_size
    pid_n = (pid % (GROUP_M * grid_n)) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < f
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    x_ptrs = X + rows64[:, None] * stride_xm + ks[None, :] * stride_xk      # [BM, BK]
    wg_ptrs = W + cols64[None, :] * stride_wn + ks[:, None] * stride_wk     # [BK, BN]
    wu_ptrs = wg_ptrs + f * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bg = tl.load(wg_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        bu = tl.load(wu_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk

    mask = row_ok[:, None] & col_ok[None, :]
    sig = tl.sigmoid(acc_g)
    out_ptrs = OUT + rows64[:, None] * stride_om + cols[None, :]
    if BACKWARD:
        dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        dg = dy * acc_u * sig * (1.0 + acc_g * (1.0 - sig))
        du = dy * acc_g * sig
        tl.store(out_ptrs, dg.to(OUT.dtype.element_ty), mask=mask)
        tl.store(out_ptrs + f, du.to(OUT.dtype.element_ty), mask=mask)
    else:
        y = acc_g * sig * acc_u
        tl.store(out_ptrs, y.to(OUT.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------- launchers
def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _elementwise_blocks(n_rows: int, f: int):
    if interpreting():
        block_n = max(16, min(triton.next_power_of_2(f), 1024))
        return max(1, min(triton.next_power_of_2(n_rows), 16384 // block_n)), block_n, 4
    return 4, 1024, 4  # 4 x 1024 elements: 32 per thread at 4 warps, memory bound anyway


def swiglu_forward(x2: torch.Tensor) -> torch.Tensor:
    m, f = x2.shape[0], x2.shape[1] // 2
    y = torch.empty((m, f), device=x2.device, dtype=x2.dtype)
    bm, bn, warps = _elementwise_blocks(m, f)
    _swiglu_fwd[(triton.cdiv(m, bm), triton.cdiv(f, bn))](
        x2, y, m, f, x2.stride(0), y.stride(0), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return y


def swiglu_backward(x2: torch.Tensor, dy2: torch.Tensor) -> torch.Tensor:
    m, f = x2.shape[0], x2.shape[1] // 2
    dx = torch.empty(x2.shape, device=x2.device, dtype=x2.dtype)
    bm, bn, warps = _elementwise_blocks(m, f)
    _swiglu_bwd[(triton.cdiv(m, bm), triton.cdiv(f, bn))](
        x2, dy2, dx, m, f, x2.stride(0), dy2.stride(0), dx.stride(0), BLOCK_M=bm,
        BLOCK_N=bn, num_warps=warps)
    return dx


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per (target, 16-bit / fp32), checked
# ahead of time by runners/check_kernels.py (no spills, within shared memory, tensor-core
# dots for 16-bit). Two [BM, BN] fp32 accumulators live in registers: 128 x 64 x 2 at 8
# warps is 64 registers a thread. fp32 ("ieee") dots hold their operands in registers as
# well: at 4 warps the 64 x 64 x 32 fp32 tile spilled ~1.2 KB on sm_80, at 8 it does not.
MATMUL_TILES = {
    (80, "16"): (128, 64, 64, 8, 3),
    (80, "32"): (64, 64, 32, 8, 3),
    (90, "16"): (128, 64, 64, 8, 3),
    (90, "32"): (64, 64, 32, 8, 3),
}


def _matmul_config(m: int, f: int, k: int, dtype: torch.dtype, arch: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for x [m, k] @ W [2f, k]^T."""
    if interpreting():
        def fit(n, cap):
            return max(16, min(triton.next_power_of_2(n), cap))
        return fit(m, 64), fit(f, 64), fit(k, 64), 4, 1
    return MATMUL_TILES[(90 if arch >= 90 else 80, "32" if dtype == torch.float32 else "16")]


def _launch_matmul(x2, weight, out, dy, backward: bool):
    m, k = x2.shape
    f = weight.shape[0] // 2
    arch = 0 if interpreting() else gpu_target(x2.device)[0]
    bm, bn, bk, warps, stages = _matmul_config(m, f, k, x2.dtype, arch)
    grid = (triton.cdiv(m, bm) * triton.cdiv(f, bn),)
    _swiglu_matmul[grid](
        x2, weight, out, dy if dy is not None else out, m, f, k, x2.stride(0), x2.stride(1),
        weight.stride(0), weight.stride(1), out.stride(0),
        dy.stride(0) if dy is not None else 0, BACKWARD=backward,
        PRECISION=dot_precision(x2.dtype), UPCAST=upcast_dot(x2.dtype), BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)


def swiglu_linear_forward(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = torch.empty((x2.shape[0], weight.shape[0] // 2), device=x2.device, dtype=x2.dtype)
    _launch_matmul(x2, weight, out, None, backward=False)
    return out


def default_chunk_rows(m: int, h: int, two_f: int) -> int:
    """Rows per backward chunk: the [chunk, 2f] d[gate | up] buffer about the size of x."""
    return max(16, triton.next_power_of_2(triton.cdiv(m, triton.cdiv(two_f, h))))


def swiglu_linear_backward(x2, weight, dy2, need_dx: bool, need_dw: bool, chunk_rows: int):
    def dgate_up_of(c0, c1):
        dgu = torch.empty((c1 - c0, weight.shape[0]), device=x2.device, dtype=x2.dtype)
        _launch_matmul(x2[c0:c1], weight, dgu, dy2[c0:c1], backward=True)
        return dgu

    return chunked_linear_backward(x2, weight, chunk_rows, dgate_up_of, need_dx, need_dw)


# --------------------------------------------------------------------------- autograd
class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x2 = _rows(x, x.shape[-1])
        ctx.save_for_backward(x2)
        ctx.x_shape = x.shape
        return swiglu_forward(x2).view(*x.shape[:-1], x.shape[-1] // 2)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        return swiglu_backward(x2, _rows(dy, dy.shape[-1])).view(ctx.x_shape)


class SwiGLULinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, chunk_rows):
        h = x.shape[-1]
        x2 = _rows(x, h)
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        ctx.chunk_rows = chunk_rows or default_chunk_rows(x2.shape[0], h, weight.shape[0])
        out = swiglu_linear_forward(x2, weight)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        dx, dw = swiglu_linear_backward(x2, weight, _rows(dy, dy.shape[-1]),
                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                        ctx.chunk_rows)
        return (dx.view(ctx.x_shape) if dx is not None else None), dw, None


# ------------------------------------------------------------------------ entry points
def swiglu(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2f] = [gate | up] -> silu(gate) * up [..., f]."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim {x.shape[-1]} must be even ([gate | up])")
    return SwiGLUFunction.apply(x)


def swiglu_linear(x: torch.Tensor, weight: torch.Tensor, chunk_rows: int | None = None):
    """swiglu(x @ weight.T) for weight [2f, h], without materialising x @ weight.T.
    chunk_rows bounds the backward's recomputed [chunk, 2f] buffer (default ~ size of x)."""
    if weight.dim() != 2 or weight.shape[0] % 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"swiglu_linear: weight shape {tuple(weight.shape)} must be "
                         f"[2f, {x.shape[-1]}]")
    if x.dtype != weight.dtype:
        raise ValueError(f"swiglu_linear: x dtype {x.dtype} != weight dtype {weight.dtype}")
    if chunk_rows is not None and chunk_rows <= 0:
        raise ValueError(f"swiglu_linear: chunk_rows={chunk_rows} must be positive")
    return SwiGLULinearFunction.apply(x, weight, chunk_rows)
