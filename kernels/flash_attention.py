"""FlashAttention-2 style attention, forward and backward (semantics:
kernels.reference.attention / attention_mask).

q [b, nh, sq, d], k/v [b, ng, sk, d], query head h reads KV group h // (nh // ng): GQA and
MQA index the group, K/V are never repeated. Any strides with a unit last dim (the
model's permuted views and KV-cache slices go in without a copy).

Mask, evaluated in-kernel from integer lengths: query row r sits at absolute index
i = q_offset + r, and key j is visible when
    (j < prefix[i] or j <= i)  and  j >= doc_start[i]  and  (j >= pad or i < pad)  and  j < sk.
prefix and doc_start are per position (packed rows: several documents per row, each
attending only to itself; model/masks.py `pack`); one example per row is the case
doc_start = 0, prefix = prefix_lens[b] at every position, read with a position stride of
0. With doc_end[j] (derived here from doc_start, documents being contiguous) the same
mask reads key-side, as the dK/dV kernel needs it: i >= (doc_start[j] if j < prefix[j]
else j) and i < doc_end[j].
A query block walks its keys in three segments: [lo, full_lo) masked (the left-pad edge),
[full_lo, full_hi) fully visible (no mask arithmetic: the bulk of the work), [full_hi, hi)
masked (the causal diagonal / end of sequence). Key blocks past hi are skipped, so causal
attention does half the work. The backward splits its loops the same way. Packed rows
(a compile-time variant) take one masked walk over [lo, hi), from the block's earliest
document start: their documents are short, a tile rarely lies inside one, and fewer
loops keep the packed dK/dV kernel within its registers.

Numerics: scores in the exp2 domain (scale * log2 e folded into one multiply), online
softmax with fp32 running max / sum / accumulator; the forward saves only
lse2 = max + log2(sum) per row [b, nh, sq] (fp32). Backward (FA2): delta = rowsum(dO * O),
then one kernel per key block for dK/dV (looping over the group's query heads, so the
group sum happens in registers) and one per query block for dQ. Nothing [sq, sk] is ever
stored. P and dS are cast to the input dtype for the tensor-core matmuls (fp32 stays fp32).
A row that can see no key at all (only possible when pad >= sk) returns 0 here; the
reference returns NaN.

The output lives in [sq, b, nh, d] memory and is returned as the [b, nh, sq, d] view: the
model's next step, permute(2, 0, 1, 3).reshape(s, b, nh * d), is then free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources, PTXASError

from kernels.ops import dot_precision, gpu_target, interpreting, upcast_dot

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _visible(i, j, pre, pad, sk):
    """The reference mask for absolute query indices i and key indices j (broadcast)."""
    return ((j < pre) | (j <= i)) & ((j >= pad) | (i < pad)) & (j < sk)


@triton.jit
def _visible_rows(i_abs, cols, ds, pre, pad, sk, PACKED: tl.constexpr):
    """[M, N] mask of query rows i_abs [M] against key columns cols [N]. Packed: per-row
    document starts ds and prefix ends pre [M]; else one prefix (scalar) for the row."""
    if PACKED:
        return _visible(i_abs[:, None], cols[None, :], pre[:, None], pad, sk) & (
            cols[None, :] >= ds[:, None])
    else:
        return _visible(i_abs[:, None], cols[None, :], pre, pad, sk)


@triton.jit
def _visible_from_key(i, j, first, de, pad, sk):
    """The same mask from the key side: first[j] = the first query that may see key j
    (its document's start inside the prefix, else j itself), de[j] = its document's end."""
    return (i >= first) & (i < de) & ((j >= pad) | (i < pad)) & (j < sk)


@triton.jit
def _row_mask_info(META, smb, smk, smp, b, i_abs, row_ok, PACKED: tl.constexpr):
    """Per query row its document start and prefix end (absolute), [M]; one example per
    row: doc start 0 and the row's prefix, scalars."""
    if PACKED:
        base = META + b * smb + i_abs.to(tl.int64) * smp
        ds = tl.load(base, mask=row_ok, other=0)
        pre = tl.load(base + smk, mask=row_ok, other=0)
    else:
        ds = 0
        pre = tl.load(META + b * smb + smk)
    return ds, pre


@triton.jit
def _key_segments(i0, i_last, i_abs, row_ok, ds, pre, pad, sk, BLOCK_N: tl.constexpr,
                  PACKED: tl.constexpr):
    """Key ranges for a query block with absolute rows [i0, i_last]: see module doc.
    Every bound is a multiple of BLOCK_N except hi (ends are masked anyway)."""
    no_pad_rows = i0 >= pad  # a block holding pad queries takes the masked path throughout
    lo = tl.where(no_pad_rows, (pad // BLOCK_N) * BLOCK_N, 0)
    full_lo = tl.where(no_pad_rows, tl.cdiv(pad, BLOCK_N) * BLOCK_N, 0)
    if PACKED:
        # per row, keys from its doc start and below reach = max(prefix, i + 1) may be
        # visible (the packed kernels walk [lo, hi) masked: full_* go unused)
        reach = tl.maximum(pre, i_abs + 1)
        hi = tl.minimum(sk, tl.max(tl.where(row_ok, reach, 0)))
        reach_all = tl.min(tl.where(row_ok, reach, sk))
        lo = tl.maximum(lo, (tl.min(tl.where(row_ok, ds, sk)) // BLOCK_N) * BLOCK_N)
    else:
        hi = tl.minimum(sk, tl.maximum(pre, i_last + 1))
        reach_all = tl.maximum(pre, i0 + 1)
    full_hi = tl.where(no_pad_rows, (tl.minimum(reach_all, sk) // BLOCK_N) * BLOCK_N, 0)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, i_abs, start, end, ds, pre, pad, sk,
               qk_scale, d_ok, MASKED: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               PACKED: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = k_base + (start + offs_n).to(tl.int64)[None, :] * sks + offs_d[:, None]  # [D, N]
    v_ptrs = v_base + (start + offs_n).to(tl.int64)[:, None] * svs + offs_d[None, :]  # [N, D]
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        if MASKED:
            k = tl.load(k_ptrs, mask=d_ok[:, None] & (cols < sk)[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=(cols < sk)[:, None] & d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [M, N], log2 domain
        if MASKED:
            s = tl.where(_visible_rows(i_abs, cols, ds, pre, pad, sk, PACKED), s,
                         float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing visible yet keeps max -inf: subtract 0 instead (no inf - inf)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)  # rescales the old sum/accumulator to the new max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * sks
        v_ptrs += BLOCK_N * svs
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, META, PAD, qk_scale, q_offset, n_heads, rep, sq, sk, head_dim,
              sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, smk, smb, smp,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PACKED: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    g = h // rep
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = rows < sq
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows.to(tl.int64)[:, None] * sqs + offs_d[None, :],
                mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + g * skh
    v_base = V + b * svb + g * svh
    pad = tl.load(PAD + b)
    i_abs = rows + q_offset
    i0 = start_m * BLOCK_M + q_offset
    i_last = tl.minimum(start_m * BLOCK_M + BLOCK_M, sq) - 1 + q_offset
    ds, pre = _row_mask_info(META, smb, smk, smp, b, i_abs, row_ok, PACKED)
    lo, full_lo, full_hi, hi = _key_segments(i0, i_last, i_abs, row_ok, ds, pre, pad, sk,
                                             BLOCK_N, PACKED)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if PACKED:  # one masked walk over [lo, hi): see _key_segments
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, i_abs, lo, hi,
                                   ds, pre, pad, sk, qk_scale, d_ok, True, PRECISION, UPCAST,
                                   BLOCK_N, BLOCK_D, PACKED)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, i_abs, lo,
                                   full_lo, ds, pre, pad, sk, qk_scale, d_ok, True, PRECISION,
                                   UPCAST, BLOCK_N, BLOCK_D, PACKED)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, i_abs, full_lo,
                                   full_hi, ds, pre, pad, sk, qk_scale, d_ok, False, PRECISION,
                                   UPCAST, BLOCK_N, BLOCK_D, PACKED)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, i_abs, full_hi,
                                   hi, ds, pre, pad, sk, qk_scale, d_ok, True, PRECISION,
                                   UPCAST, BLOCK_N, BLOCK_D, PACKED)
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + rows.to(tl.int64)[:, None] * sos + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=io_mask)
    # +inf makes every backward probability of an unseeing row exp2(-inf) = 0
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * sq + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, n_heads, sq, head_dim, sob, soh, sos, sdob, sdoh, sdos,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta = rowsum(dO * O) [b, nh, sq]: the softmax backward's per-row correction
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < sq)[:, None] & (offs_d < head_dim)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    o = tl.load(O + b * sob + h * soh + r64 * sos + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + r64 * sdos + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * sq + rows, delta, mask=rows < sq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sdos, cols, start,
                end, q_offset, first, de, pad, sq, sk, qk_scale, d_ok, MASKED: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, PACKED: tl.constexpr):
    # packed: first [N] / de [N] per key (module doc); else first is the row's prefix
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + offs_m
        row_ok = rows < sq
        r64 = rows.to(tl.int64)
        # rows past sq load q = dO = 0, so they add exactly 0 to dK and dV
        qT = tl.load(q_base + r64[None, :] * sqs + offs_d[:, None],
                     mask=d_ok[:, None] & row_ok[None, :], other=0.0)       # [D, M]
        do = tl.load(do_base + r64[:, None] * sdos + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)       # [M, D]
        if UPCAST:
            qT, do = qT.to(tl.float32), do.to(tl.float32)
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale            # [N, M]
        pT = tl.exp2(sT - lse[None, :])
        if MASKED:
            if PACKED:
                vis = _visible_from_key(rows[None, :] + q_offset, cols[:, None],
                                        first[:, None], de[:, None], pad, sk)
            else:
                vis = _visible(rows[None, :] + q_offset, cols[:, None], first, pad, sk)
            pT = tl.where(vis, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)            # [N, M]
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, META, PAD, qk_scale, sm_scale, q_offset,
                   n_heads, n_groups, rep, n_splits, sq, sk, head_dim,
                   sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos,
                   sdk_split, sdkb, sdkh, sdks, sdv_split, sdvb, sdvh, sdvs, smk, smb, smp,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PACKED: tl.constexpr):
    """One key block of one KV group; loops over this split's query heads of the group."""
    start_n = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // (n_groups * n_splits)).to(tl.int64)
    g = ((pid // n_splits) % n_groups).to(tl.int64)
    split = (pid % n_splits).to(tl.int64)
    heads_per_split = rep // n_splits
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_mask = (cols < sk)[:, None] & d_ok[None, :]
    c64 = cols.to(tl.int64)[:, None]
    k = tl.load(K + b * skb + g * skh + c64 * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + g * svh + c64 * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    if PACKED:
        pad = tl.load(PAD + b)
        n0 = start_n * BLOCK_N
        # the block's keys: document start, prefix end, document end; first query per key
        col_ok = cols < sk
        meta = META + b * smb + cols.to(tl.int64) * smp
        ds = tl.load(meta, mask=col_ok, other=0)
        pre = tl.load(meta + smk, mask=col_ok, other=0)
        de = tl.load(meta + 2 * smk, mask=col_ok, other=0)
        first_c = tl.where(cols < pre, ds, cols)
        # rows that can see a key of the block: from its keys' earliest first query (not
        # before pad) to their last document end
        first = tl.min(tl.where(col_ok, first_c, sk))
        first = tl.where(n0 >= pad, tl.maximum(first, pad), first)
        r_lo = (tl.maximum(first - q_offset, 0) // BLOCK_M) * BLOCK_M
        last = tl.max(tl.where(col_ok, de, 0))
        r_end = tl.minimum(tl.cdiv(sq, BLOCK_M),
                           tl.cdiv(tl.maximum(last - q_offset, 0), BLOCK_M)) * BLOCK_M
    else:
        pre = tl.load(META + b * smb + smk)  # the row's prefix
        pad = tl.load(PAD + b)

        # query rows that can see any key of [n0, n0 + BLOCK_N): all rows if the block
        # touches the prefix, else rows at or after n0 (causal); pad queries never see
        # keys >= pad
        n0 = start_n * BLOCK_N
        first = tl.where(n0 < pre, 0, n0)
        first = tl.where(n0 >= pad, tl.maximum(first, pad), first)
        r_lo = (tl.maximum(first - q_offset, 0) // BLOCK_M) * BLOCK_M
        r_end = tl.cdiv(sq, BLOCK_M) * BLOCK_M
        # rows from r_full on see the whole block: past pad, and past its last key or
        # inside the prefix; a block with pad keys or keys past sk is masked throughout
        need = tl.maximum(pad, tl.where(n0 + BLOCK_N <= pre, 0, n0 + BLOCK_N - 1))
        r_full = tl.cdiv(tl.maximum(need - q_offset, 0), BLOCK_M) * BLOCK_M
        r_full = tl.where((n0 >= pad) & (n0 + BLOCK_N <= sk), r_full, r_end)
        r_full = tl.minimum(tl.maximum(r_full, r_lo), r_end)
        first_c = pre
        de = sk

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    h_first = g * rep + split * heads_per_split
    for h in range(h_first, h_first + heads_per_split):
        bh = b * n_heads + h
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        if PACKED:  # one masked walk over the rows that can see the block
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + bh * sq,
                                 DELTA + bh * sq, sqs, sdos, cols, r_lo, r_end, q_offset,
                                 first_c, de, pad, sq, sk, qk_scale, d_ok, True, PRECISION,
                                 UPCAST, BLOCK_M, BLOCK_D, PACKED)
        else:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + bh * sq,
                                 DELTA + bh * sq, sqs, sdos, cols, r_lo, r_full, q_offset,
                                 first_c, de, pad, sq, sk, qk_scale, d_ok, True, PRECISION,
                                 UPCAST, BLOCK_M, BLOCK_D, PACKED)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + bh * sq,
                                 DELTA + bh * sq, sqs, sdos, cols, r_full, r_end, q_offset,
                                 first_c, de, pad, sq, sk, qk_scale, d_ok, False, PRECISION,
                                 UPCAST, BLOCK_M, BLOCK_D, PACKED)
    dk *= sm_scale  # d s / d k = sm_scale * q (qk_scale's log2 e belongs to exp2 only)
    tl.store(DK + split * sdk_split + b * sdkb + g * sdkh + c64 * sdks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + split * sdv_split + b * sdvb + g * sdvh + c64 * sdvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, i_abs, start, end, dstart, pre,
              pad, sk, qk_scale, d_ok, MASKED: tl.constexpr, PRECISION: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PACKED: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kT_ptrs = k_base + (start + offs_n).to(tl.int64)[None, :] * sks + offs_d[:, None]  # [D, N]
    vT_ptrs = v_base + (start + offs_n).to(tl.int64)[None, :] * svs + offs_d[:, None]  # [D, N]
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        if MASKED:
            ld_mask = d_ok[:, None] & (cols < sk)[None, :]
        else:
            ld_mask = d_ok[:, None] & (cols >= 0)[None, :]
        kT = tl.load(kT_ptrs, mask=ld_mask, other=0.0)
        vT = tl.load(vT_ptrs, mask=ld_mask, other=0.0)
        if UPCAST:
            kT, vT = kT.to(tl.float32), vT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible_rows(i_abs, cols, dstart, pre, pad, sk, PACKED), p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
        kT_ptrs += BLOCK_N * sks
        vT_ptrs += BLOCK_N * svs
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, META, PAD, qk_scale, sm_scale, q_offset,
                 n_heads, rep, sq, sk, head_dim, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                 sdob, sdoh, sdos, sdqb, sdqh, sdqs, smk, smb, smp, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PACKED: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    g = h // rep
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = rows < sq
    io_mask = row_ok[:, None] & d_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    q = tl.load(Q + b * sqb + h * sqh + r64 * sqs + offs_d[None, :], mask=io_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + r64 * sdos + offs_d[None, :], mask=io_mask,
                 other=0.0)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * sq + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * sq + rows, mask=row_ok, other=0.0)
    k_base = K + b * skb + g * skh
    v_base = V + b * svb + g * svh
    pad = tl.load(PAD + b)
    i_abs = rows + q_offset
    i0 = start_m * BLOCK_M + q_offset
    i_last = tl.minimum(start_m * BLOCK_M + BLOCK_M, sq) - 1 + q_offset
    ds, pre = _row_mask_info(META, smb, smk, smp, b, i_abs, row_ok, PACKED)
    lo, full_lo, full_hi, hi = _key_segments(i0, i_last, i_abs, row_ok, ds, pre, pad, sk,
                                             BLOCK_N, PACKED)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if PACKED:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, i_abs, lo, hi, ds,
                       pre, pad, sk, qk_scale, d_ok, True, PRECISION, UPCAST, BLOCK_N,
                       BLOCK_D, PACKED)
    else:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, i_abs, lo, full_lo,
                       ds, pre, pad, sk, qk_scale, d_ok, True, PRECISION, UPCAST, BLOCK_N,
                       BLOCK_D, PACKED)
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, i_abs, full_lo,
                       full_hi, ds, pre, pad, sk, qk_scale, d_ok, False, PRECISION, UPCAST,
                       BLOCK_N, BLOCK_D, PACKED)
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sks, svs, i_abs, full_hi, hi,
                       ds, pre, pad, sk, qk_scale, d_ok, True, PRECISION, UPCAST, BLOCK_N,
                       BLOCK_D, PACKED)
    dq *= sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + r64 * sdqs + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=io_mask)


# --------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class Blocks:
    """Tile shape of one kernel launch; `warps`/`stages` only matter on a GPU."""
    m: int
    n: int
    warps: int = 4
    stages: int = 1


@dataclass(frozen=True)
class Options:
    """Test / tuning overrides: forced tiles and dK/dV head splits."""
    blocks: tuple[int, int] | None = None
    kv_head_splits: int | None = None


# Tiles per (target, head_dim bucket, 16-bit / fp32, kernel), chosen ahead of time with
# runners/check_kernels.py: each compiles for its target without register spills, within
# shared memory, and with tensor-core dots for fp16 / bf16. The first choices that spilled
# (a 32 x 128 dK/dV tile at head_dim 128 on sm_80: ~17 KB of spills; 64 x 32 fp32 tiles:
# up to 100 KB) are what the smaller tiles here replace. On sm_90 no dK/dV tile at
# head_dim 128 that reaches wgmma compiled without spills (12 tried: 96-1,480 B), so that
# pick runs mma.sync. "dec" is the forward at <= 16 query rows (decoding), where a
# 128-row query tile would be mostly empty.
TILES: dict[tuple[int, int, str, str], Blocks] = {
    (80, 128, "16", "fwd"): Blocks(128, 32, 8, 2),
    (80, 128, "16", "dkdv"): Blocks(32, 64, 8, 2),
    (80, 128, "16", "dq"): Blocks(128, 32, 8, 3),
    (80, 128, "16", "dec"): Blocks(16, 64, 4, 3),
    (80, 128, "32", "fwd"): Blocks(32, 32, 4, 1),
    (80, 128, "32", "dkdv"): Blocks(16, 32, 4, 1),
    (80, 128, "32", "dq"): Blocks(32, 16, 4, 1),
    (80, 128, "32", "dec"): Blocks(16, 16, 4, 1),
    (80, 64, "16", "fwd"): Blocks(128, 64, 8, 3),
    (80, 64, "16", "dkdv"): Blocks(32, 32, 4, 2),
    (80, 64, "16", "dq"): Blocks(128, 32, 8, 3),
    (80, 64, "16", "dec"): Blocks(16, 64, 4, 3),
    (80, 64, "32", "fwd"): Blocks(32, 32, 8, 1),
    (80, 64, "32", "dkdv"): Blocks(16, 32, 4, 1),
    (80, 64, "32", "dq"): Blocks(32, 32, 4, 1),
    (80, 64, "32", "dec"): Blocks(16, 32, 4, 1),
    (90, 128, "16", "fwd"): Blocks(128, 64, 8, 3),
    (90, 128, "16", "dkdv"): Blocks(32, 32, 4, 2),
    (90, 128, "16", "dq"): Blocks(128, 32, 8, 3),
    (90, 128, "16", "dec"): Blocks(16, 64, 4, 3),
    (90, 128, "32", "fwd"): Blocks(16, 16, 4, 1),
    (90, 128, "32", "dkdv"): Blocks(16, 16, 4, 1),
    (90, 128, "32", "dq"): Blocks(16, 16, 4, 1),
    (90, 128, "32", "dec"): Blocks(16, 64, 4, 3),
    (90, 64, "16", "fwd"): Blocks(128, 64, 8, 3),
    (90, 64, "16", "dkdv"): Blocks(32, 128, 8, 3),
    (90, 64, "16", "dq"): Blocks(128, 32, 8, 3),
    (90, 64, "16", "dec"): Blocks(16, 64, 4, 3),
    (90, 64, "32", "fwd"): Blocks(32, 32, 4, 1),
    (90, 64, "32", "dkdv"): Blocks(16, 32, 8, 1),
    (90, 64, "32", "dq"): Blocks(32, 16, 4, 1),
    (90, 64, "32", "dec"): Blocks(16, 64, 4, 3),
}
# smaller tiles tried in turn if a pick does not fit (a GPU outside the table, e.g. the
# 99 KB of shared memory of sm_86 / sm_89)
_FALLBACKS = [Blocks(32, 32, 4, 1), Blocks(16, 16, 4, 1)]


def tile_key(kind: str, d: int, dtype: torch.dtype, sq: int, arch: int):
    """The TILES entry a launch uses: sm_9x takes the sm_90 tiles, anything older sm_80's;
    head_dim 64 and below the d64 tiles, larger ones the d128 tiles."""
    if kind == "fwd" and sq <= 16:
        kind = "dec"
    return (90 if arch >= 90 else 80, 64 if d <= 64 else 128,
            "32" if dtype == torch.float32 else "16", kind)


def _gpu_configs(kind: str, d: int, dtype: torch.dtype, sq: int, arch: int) -> list[Blocks]:
    """The checked pick first, then the fallbacks (tried on OutOfResources only)."""
    pick = TILES[tile_key(kind, d, dtype, sq, arch)]
    return [pick] + [b for b in _FALLBACKS if (b.m, b.n) < (pick.m, pick.n)]


def _configs(kind: str, d: int, dtype: torch.dtype, sq: int, sk: int, opts: Options,
             device) -> list[Blocks]:
    if opts.blocks is not None:
        return [Blocks(*opts.blocks)]
    if interpreting():
        # the interpreter pays ~3 ms per program and per loop step: the largest tiles
        def fit(n):
            return max(16, min(64, triton.next_power_of_2(n)))
        return [Blocks(fit(sq), fit(sk))]
    return _gpu_configs(kind, d, dtype, sq, gpu_target(device)[0])


_chosen: dict = {}  # (kind, d, dtype, configs) -> index of the first config that compiled


def _launch(kernel, kind: str, key, configs: list[Blocks], grid, args, **constexprs) -> Blocks:
    key = (kind, key, tuple(configs))
    start = _chosen.get(key, 0)
    for i in range(start, len(configs)):
        cfg = configs[i]
        try:
            kernel[grid(cfg)](*args, BLOCK_M=cfg.m, BLOCK_N=cfg.n, num_warps=cfg.warps,
                              num_stages=cfg.stages, **constexprs)
        except (OutOfResources, PTXASError):
            if i == len(configs) - 1:
                raise
            continue
        _chosen[key] = i
        return cfg
    raise AssertionError("unreachable")


def _lengths(t, b: int, device, name: str) -> torch.Tensor:
    if t is None:
        return torch.zeros(b, dtype=torch.int32, device=device)
    t = torch.as_tensor(t, device=device).reshape(-1)
    if t.numel() not in (1, b):
        raise ValueError(f"attention: {name} has {t.numel()} entries for batch {b}")
    return t.to(torch.int32).expand(b).contiguous()


def _mask_meta(prefix_lens, doc_starts, padded: bool, b: int, sk: int,
               device) -> torch.Tensor:
    """int32 [3, b, sk] (doc_start, prefix end, doc end) per key position; for one example
    per row [3, b, 1], read with a position stride of 0 (`_meta_strides`)."""
    per_token = prefix_lens is not None and torch.as_tensor(prefix_lens).dim() == 2
    if doc_starts is None and not per_token:
        prefix = _lengths(prefix_lens, b, device, "prefix_lens")
        meta = torch.stack([torch.zeros_like(prefix), prefix, torch.full_like(prefix, sk)])
        return meta.unsqueeze(-1)
    if padded:
        raise ValueError("attention: packed rows (doc_starts / per-position prefix_lens) and "
                         "left padding (pad_lens) cannot be combined")
    pos = torch.arange(sk, device=device, dtype=torch.int32).expand(b, sk)
    ds = (torch.zeros((b, sk), dtype=torch.int32, device=device) if doc_starts is None
          else torch.as_tensor(doc_starts, device=device).to(torch.int32))
    if ds.shape != (b, sk):
        raise ValueError(f"attention: doc_starts {tuple(ds.shape)} must be [b, sk] = "
                         f"[{b}, {sk}]")
    if prefix_lens is None:
        pre = ds  # causal documents
    elif not per_token:
        raise ValueError("attention: with doc_starts, prefix_lens must be per position "
                         f"[b, sk] = [{b}, {sk}]")
    else:
        pre = torch.as_tensor(prefix_lens, device=device).to(torch.int32)
        if pre.shape != (b, sk):
            raise ValueError(f"attention: prefix_lens {tuple(pre.shape)} must be [b, sk] = "
                             f"[{b}, {sk}]")
    # doc end of position i: the next position that starts a document (documents are
    # contiguous runs of equal doc_start), else sk
    starts = torch.where(ds == pos, pos, torch.full_like(pos, sk))
    nxt = torch.cat([starts[:, 1:], torch.full_like(starts[:, :1], sk)], dim=1)
    de = nxt.flip(1).cummin(1).values.flip(1)
    return torch.stack([ds, pre, de]).contiguous()


def _meta_strides(meta: torch.Tensor):
    return meta.stride(0), meta.stride(1), meta.stride(2) if meta.shape[2] > 1 else 0


def _check(q, k, v, q_offset):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention: q, k, v must be 4-D [b, heads, seq, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    b, nh, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on "
                         "batch or head_dim")
    if nh % k.shape[1]:
        raise ValueError(f"attention: {nh} query heads are not divisible by {k.shape[1]} "
                         "KV groups")
    if not 1 <= d <= 256:
        raise ValueError(f"attention: head_dim={d} must be in 1..256")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16,
                                                              torch.float32):
        raise ValueError(f"attention: q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} must match "
                         "and be fp16, bf16 or fp32")
    if not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"attention: q_offset={q_offset!r} must be a non-negative int")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _like_model(shape, ref: torch.Tensor, dtype=None) -> torch.Tensor:
    """An empty [b, n, s, d] tensor stored as [s, b, n, d] (the model's layout)."""
    b, n, s, d = shape
    return torch.empty((s, b, n, d), device=ref.device,
                       dtype=dtype or ref.dtype).permute(1, 2, 0, 3)


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def attention_forward(q, k, v, meta, pad, q_offset: int, opts: Options):
    b, nh, sq, d = q.shape
    ng, sk = k.shape[1], k.shape[2]
    o = _like_model(q.shape, q)
    lse = torch.empty((b, nh, sq), device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(d))
    configs = _configs("fwd", d, q.dtype, sq, sk, opts, q.device)
    packed = meta.shape[2] > 1
    _launch(_attn_fwd, "fwd", (d, q.dtype, packed), configs,
            lambda c: (triton.cdiv(sq, c.m), b * nh),
            (q, k, v, o, lse, meta, pad, LOG2E / math.sqrt(d), q_offset, nh, nh // ng, sq,
             sk, d, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o),
             *_meta_strides(meta)),
            PRECISION=dot_precision(q.dtype), UPCAST=upcast_dot(q.dtype), BLOCK_D=block_d,
            PACKED=packed)
    return o, lse


def _head_splits(rep: int, programs: int, device, opts: Options) -> int:
    """Split a KV group's query heads over this many dK/dV programs (partial sums added
    afterwards) when one program per key block and group would leave SMs idle."""
    if opts.kv_head_splits is not None:
        if rep % opts.kv_head_splits:
            raise ValueError(f"attention: kv_head_splits={opts.kv_head_splits} does not "
                             f"divide {rep} heads per group")
        return opts.kv_head_splits
    if interpreting():
        return 1
    target = 2 * gpu_target(device)[1]
    splits = 1
    while programs * splits < target and rep % (2 * splits) == 0:
        splits *= 2
    return splits


def attention_backward(do, q, k, v, o, lse, meta, pad, q_offset: int, opts: Options):
    b, nh, sq, d = q.shape
    ng, sk = k.shape[1], k.shape[2]
    rep = nh // ng
    do = _unit_last(do)
    block_d = max(16, triton.next_power_of_2(d))
    precision, upcast = dot_precision(q.dtype), upcast_dot(q.dtype)
    sm_scale = 1.0 / math.sqrt(d)
    qk_scale = sm_scale * LOG2E

    delta = torch.empty_like(lse)
    bm_delta = max(16, min(64 if interpreting() else 128, triton.next_power_of_2(sq)))
    _attn_bwd_delta[(triton.cdiv(sq, bm_delta), b * nh)](
        o, do, delta, nh, sq, d, *_strides3(o), *_strides3(do), BLOCK_M=bm_delta,
        BLOCK_D=block_d)

    # dK, dV: one program per (key block, group[, head split])
    dkdv_cfgs = _configs("dkdv", d, q.dtype, sq, sk, opts, q.device)
    splits = _head_splits(rep, triton.cdiv(sk, dkdv_cfgs[0].n) * b * ng, q.device, opts)
    if splits == 1:
        dk, dv = _like_model(k.shape, k), _like_model(v.shape, v)
        dk_t, dv_t = dk.unsqueeze(0), dv.unsqueeze(0)  # split dim of size 1
    else:  # fp32 partial sums per split, reduced below
        dk_t = torch.empty((splits, b, ng, sk, d), device=q.device, dtype=torch.float32)
        dv_t = torch.empty_like(dk_t)
    packed = meta.shape[2] > 1
    _launch(_attn_bwd_dkdv, "dkdv", (d, q.dtype, packed), dkdv_cfgs,
            lambda c: (triton.cdiv(sk, c.n), b * ng * splits),
            (q, k, v, do, lse, delta, dk_t, dv_t, meta, pad, qk_scale, sm_scale, q_offset,
             nh, ng, rep, splits, sq, sk, d, *_strides3(q), *_strides3(k), *_strides3(v),
             *_strides3(do), dk_t.stride(0), *_strides3(dk_t[0]), dv_t.stride(0),
             *_strides3(dv_t[0]), *_meta_strides(meta)),
            PRECISION=precision, UPCAST=upcast, BLOCK_D=block_d, PACKED=packed)
    if splits > 1:
        dk, dv = dk_t.sum(0).to(k.dtype), dv_t.sum(0).to(v.dtype)

    dq = _like_model(q.shape, q)
    dq_cfgs = _configs("dq", d, q.dtype, sq, sk, opts, q.device)
    _launch(_attn_bwd_dq, "dq", (d, q.dtype, packed), dq_cfgs,
            lambda c: (triton.cdiv(sq, c.m), b * nh),
            (q, k, v, do, lse, delta, dq, meta, pad, qk_scale, sm_scale, q_offset, nh, rep,
             sq, sk, d, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do),
             *_strides3(dq), *_meta_strides(meta)),
            PRECISION=precision, UPCAST=upcast, BLOCK_D=block_d, PACKED=packed)
    return dq, dk, dv


# --------------------------------------------------------------------------- autograd
class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta, pad, q_offset, opts):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse = attention_forward(q, k, v, meta, pad, q_offset, opts)
        ctx.save_for_backward(q, k, v, o, lse, meta, pad)
        ctx.q_offset, ctx.opts = q_offset, opts
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, meta, pad = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, meta, pad, ctx.q_offset,
                                        ctx.opts)
        return dq, dk, dv, None, None, None, None


# ------------------------------------------------------------------------ entry points
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              prefix_lens: torch.Tensor | None = None, pad_lens: torch.Tensor | None = None,
              q_offset: int = 0, *, blocks: tuple[int, int] | None = None,
              kv_head_splits: int | None = None,
              doc_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Masked softmax(q k^T / sqrt(d)) v, [b, nh, sq, d]; see the module doc for the mask
    (prefix_lens [b], or per position [b, sk] with doc_starts [b, sk] for packed rows:
    kernels.reference.attention_mask). `blocks` (BLOCK_M, BLOCK_N) and `kv_head_splits`
    override the tiling (tests, tuning)."""
    _check(q, k, v, q_offset)
    b, sk = q.shape[0], k.shape[2]
    pad = _lengths(pad_lens, b, q.device, "pad_lens")
    meta = _mask_meta(prefix_lens, doc_starts, pad_lens is not None, b, sk, q.device)
    if meta.shape[2] > 1 and q_offset + q.shape[2] > sk:
        # per-position mask data is read at every query's absolute index
        raise ValueError(f"attention: q_offset={q_offset} + {q.shape[2]} query rows exceed "
                         f"the {sk} keys of a packed row")
    return FlashAttentionFunction.apply(q, k, v, meta, pad, q_offset,
                                        Options(blocks, kv_head_splits))
