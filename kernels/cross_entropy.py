"""Fused linear + cross-entropy (semantics: kernels.reference.linear_cross_entropy):
per-token loss [N] (fp32, 0 at ignore_index) of logits = hidden [N, h] @ weight[V, h]^T,
without the [N, V] logits ever existing.

Tokens are processed in chunks of C rows: a [C, V] logits chunk (cuBLAS, input dtype,
rounded exactly like the reference's F.linear) is reduced by a Triton kernel to the loss
and an fp32 logsumexp per token, then dropped. C is picked so that a chunk's logits are
about the size of `hidden` itself.

Gradient: RECOMPUTED in backward, not computed in forward. Liger computes dlogits in the
forward and folds them into dhidden/dweight at once, which is only valid when the incoming
gradient is one scalar (a mean or sum loss). This op returns per-token losses, and the
caller may weight tokens arbitrarily (per-sample language weights, distillation mixes), so
dweight = sum_t g_t * dlogits_t^T hidden_t cannot be pre-reduced. The backward therefore
reruns the chunk matmul, turns the logits into g_t * (softmax - onehot) in place (Triton),
and applies two cuBLAS matmuls: one extra [C, h] x [h, V] matmul per chunk (the head's
cost goes from 3 to 4 matmuls) for O(C * V) memory and exact per-token weighting.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.chunked_linear import chunked_linear_backward
from kernels.ops import check_labels, interpreting


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _ce_fwd(LOGITS, LABELS, LOSS, LSE, n_rows, n_vocab, stride_l, ignore_index,
            BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = LOGITS + rows.to(tl.int64)[:, None] * stride_l
    cols = tl.arange(0, BLOCK_V)
    # online logsumexp over vocab blocks, fp32
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for v0 in range(0, n_vocab, BLOCK_V):
        mask = row_ok[:, None] & ((v0 + cols) < n_vocab)[None, :]
        x = tl.load(base + v0 + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past n_rows stay -inf
        s = s * tl.exp(m - m_use) + tl.sum(tl.exp(x - m_use[:, None]), 1)
        m = m_new
    lse = m + tl.log(tl.where(s > 0.0, s, 1.0))  # s = 0 only on rows past n_rows
    label = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (label != ignore_index)
    target = tl.load(LOGITS + rows.to(tl.int64) * stride_l + label, mask=valid,
                     other=0.0).to(tl.float32)
    tl.store(LOSS + rows, tl.where(valid, lse - target, 0.0), mask=row_ok)
    tl.store(LSE + rows, lse, mask=row_ok)


@triton.jit
def _ce_bwd(LOGITS, LABELS, LSE, GRAD, n_rows, n_vocab, stride_l, ignore_index,
            BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    # in place: logits -> g * (softmax(logits) - onehot(label)), 0 for ignored tokens
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = LOGITS + rows.to(tl.int64)[:, None] * stride_l
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g = tl.load(GRAD + rows, mask=row_ok, other=0.0)
    g = tl.where(label != ignore_index, g, 0.0)
    for v0 in range(0, n_vocab, BLOCK_V):
        vcols = v0 + cols
        mask = row_ok[:, None] & (vcols < n_vocab)[None, :]
        x = tl.load(base + vcols[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse[:, None])
        d = (p - tl.where(vcols[None, :] == label[:, None], 1.0, 0.0)) * g[:, None]
        tl.store(base + vcols[None, :], d.to(LOGITS.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers
def default_chunk_rows(n: int, h: int, vocab: int) -> int:
    """A [C, V] logits chunk about as large as hidden [N, h] (Liger's choice)."""
    return max(16, triton.next_power_of_2(triton.cdiv(n, triton.cdiv(vocab, h))))


def _blocks(rows: int, vocab: int):
    block_v = triton.next_power_of_2(vocab)
    if interpreting():
        block_v = min(block_v, 4096)
        return max(1, min(triton.next_power_of_2(rows), 16384 // block_v)), block_v, 4
    block_v = min(block_v, 8192)
    return 1, block_v, (8 if block_v >= 2048 else 4)


def _logits(h_chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.mm(h_chunk, weight.t())  # [C, V], input dtype, as the reference's F.linear


def ce_forward(hidden, weight, labels, ignore_index: int, chunk: int):
    n, vocab = hidden.shape[0], weight.shape[0]
    loss = torch.empty(n, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(n, device=hidden.device, dtype=torch.float32)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        logits = _logits(hidden[c0:c1], weight)
        br, bv, warps = _blocks(c1 - c0, vocab)
        _ce_fwd[(triton.cdiv(c1 - c0, br),)](
            logits, labels[c0:c1], loss[c0:c1], lse[c0:c1], c1 - c0, vocab,
            logits.stride(0), ignore_index, BLOCK_R=br, BLOCK_V=bv, num_warps=warps)
    return loss, lse


def ce_backward(grad, hidden, weight, labels, lse, ignore_index: int, chunk: int,
                need_dh: bool, need_dw: bool):
    vocab = weight.shape[0]
    grad = grad.float().contiguous()

    def dlogits_of(c0, c1):
        dlogits = _logits(hidden[c0:c1], weight)  # recomputed, then overwritten in place
        br, bv, warps = _blocks(c1 - c0, vocab)
        _ce_bwd[(triton.cdiv(c1 - c0, br),)](
            dlogits, labels[c0:c1], lse[c0:c1], grad[c0:c1], c1 - c0, vocab,
            dlogits.stride(0), ignore_index, BLOCK_R=br, BLOCK_V=bv, num_warps=warps)
        return dlogits

    return chunked_linear_backward(hidden, weight, chunk, dlogits_of, need_dh, need_dw)


# --------------------------------------------------------------------------- autograd
class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk):
        loss, lse = ce_forward(hidden, weight, labels, ignore_index, chunk)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk = ignore_index, chunk
        return loss

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, lse = ctx.saved_tensors
        dh, dw = ce_backward(grad, hidden, weight, labels, lse, ctx.ignore_index, ctx.chunk,
                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dh, dw, None, None, None


# ------------------------------------------------------------------------ entry points
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None):
    """Per-token loss [N] fp32 of (hidden [N, h] @ weight [V, h]^T, labels [N]).
    chunk_rows bounds the transient [chunk, V] logits (default ~ size of hidden)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} must be [N, h] and [V, h]")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden dtype {hidden.dtype} != weight "
                         f"dtype {weight.dtype}")
    if labels.shape != (hidden.shape[0],) or labels.dtype.is_floating_point:
        raise ValueError(f"linear_cross_entropy: labels must be integer [{hidden.shape[0]}], "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if chunk_rows is not None and chunk_rows <= 0:
        raise ValueError(f"linear_cross_entropy: chunk_rows={chunk_rows} must be positive")
    vocab = weight.shape[0]
    labels = labels.contiguous()
    check_labels(labels, vocab, ignore_index, "linear_cross_entropy")
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    chunk = chunk_rows or default_chunk_rows(hidden.shape[0], hidden.shape[1], vocab)
    return LinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index, chunk)
