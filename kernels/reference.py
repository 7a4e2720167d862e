"""Plain-torch references for every fused op. They define the semantics: each Triton op
must match its reference to dtype tolerance, and the model on CPU runs exactly these.

Shape conventions: attention works on [b, heads, s, d]; everything else on [..., features].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # statistics in fp32: bf16 sums of squares lose the small channels
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Returns (x + residual, rms_norm(x + residual)): the pre-norm block's residual step."""
    s = x + residual
    return s, rms_norm(s, weight, eps)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2f] laid out [gate | up] (ChatGLM's dense_h_to_4h) -> silu(gate) * up [..., f]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The FFN's first half: swiglu(x @ weight.T) with weight [2f, h]."""
    return swiglu(F.linear(x, weight))


def rotary_angles(position_ids: torch.Tensor, block_position_ids: torch.Tensor | None,
                  head_dim: int, base: float, position_scale: float = 1.0):
    """cos, sin of shape [*ids.shape, head_dim // 2], fp32.

    GLM 2D rotary: the first half of each head rotates by the position ids (ChatGLM2's
    partial rotary), the second half by the block position ids. Block ids of zero give
    angle 0, i.e. the second half passes through unchanged, which is exactly ChatGLM2.
    position_scale != 1 divides the positions first (chatglm2-6b-32k's interpolation:
    `seq_idx / rope_ratio`, in that order so fp32 angles match its code bit for bit).
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=position_ids.device,
                                            dtype=torch.float32) / half))  # [d/4]
    pos = position_ids.float()
    if position_scale != 1.0:
        pos = pos / position_scale
    ang = pos.unsqueeze(-1) * inv_freq
    if block_position_ids is None:
        ang_b = torch.zeros_like(ang)
    else:
        ang_b = block_position_ids.float().unsqueeze(-1) * inv_freq
    ang = torch.cat([ang, ang_b], dim=-1)  # [..., d/2]: one angle per adjacent pair
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last dim. x [..., d]; cos/sin broadcast
    to [..., d/2]."""
    xp = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _per_query(t: torch.Tensor, sq: int, q_offset: int) -> torch.Tensor:
    """A per-token [b, sk] tensor (absolute positions) -> the query rows' values [b, sq, 1]."""
    return t[:, q_offset:q_offset + sq].long().unsqueeze(-1)


def attention_mask(sq: int, sk: int, prefix_lens: torch.Tensor | None,
                   pad_lens: torch.Tensor | None, q_offset: int, batch: int,
                   device, doc_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [b, 1, sq, sk], True = may attend. Query row r sits at absolute index
    i = q_offset + r; key column j at j. Key j is visible from query i when
        (j < prefix or j <= i)  and  (j >= pad or i < pad)  and  j >= doc_start
    prefix = 0 is causal; prefix covering the prompt is prefix-LM / GLM Part A. pad counts
    left padding (batched generation); pad queries see only pads, never a NaN row.

    Packed rows (several documents per row, each attending only to itself): doc_starts
    [b, sk] gives each position the absolute index of its document's first token, and
    prefix_lens is then per token too, [b, sk]: the absolute end of that document's
    bidirectional prefix (<= its start: causal). Documents are contiguous, so "not before
    my start, and causal or inside my prefix" never reaches another document."""
    i = torch.arange(sq, device=device).view(1, sq, 1) + q_offset
    j = torch.arange(sk, device=device).view(1, 1, sk)
    if prefix_lens is None:
        pre = torch.zeros(batch, 1, 1, dtype=torch.long, device=device)
    elif prefix_lens.dim() == 2:
        pre = _per_query(prefix_lens.to(device), sq, q_offset)
    else:
        pre = prefix_lens.to(device).long().view(-1, 1, 1)
    allowed = (j < pre) | (j <= i)
    if doc_starts is not None:
        allowed = allowed & (j >= _per_query(doc_starts.to(device), sq, q_offset))
    if pad_lens is not None:
        pad = pad_lens.to(device).long().view(-1, 1, 1)
        allowed = allowed & ((j >= pad) | (i < pad))
    return allowed.unsqueeze(1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              prefix_lens: torch.Tensor | None = None, pad_lens: torch.Tensor | None = None,
              q_offset: int = 0, doc_starts: torch.Tensor | None = None) -> torch.Tensor:
    """q [b, nh, sq, d], k/v [b, ng, sk, d] with nh % ng == 0 (query head h uses KV group
    h // (nh // ng)). Softmax in fp32. Returns [b, nh, sq, d]. Mask: `attention_mask`.

    Matmuls in fp32 (the exact reference for 16-bit inputs too), except under autocast:
    there both run in autocast's dtype like any matmul, with the softmax still in fp32."""
    b, nh, sq, d = q.shape
    ng, sk = k.shape[1], k.shape[2]
    rep = nh // ng
    dev = q.device.type
    mm = (torch.get_autocast_dtype(dev) if torch.amp.is_autocast_available(dev)
          and torch.is_autocast_enabled(dev) else torch.float32)
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.to(mm), k.to(mm).transpose(-1, -2)).float() / math.sqrt(d)
    mask = attention_mask(sq, sk, prefix_lens, pad_lens, q_offset, b, q.device, doc_starts)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(mm), v.to(mm)).to(q.dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss [N] (fp32, 0 at ignored labels) of logits = hidden [N, h] @ weight.T."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
