"""Where each prunable structure lives inside a GLM's tensors.

One place knows the fused layouts, so importance scores and the pruner cannot disagree:

    qkv.weight   [nq*d + ng*d + ng*d, h]   rows: all query heads | K groups | V groups,
                                           each head/group a contiguous block of d rows
    dense.weight [h, nq*d]                 columns: query head j's context at j*d .. j*d+d-1
    gate_up.weight [2f, h]                 rows: gate 0..f-1 | up f..2f-1 (neuron i = i, f+i)
    down.weight  [h, f]

Query head j reads KV group j // (nq // ng) (kernels/reference.py: attention). A head's
d channels form d/2 rotary pairs (2p, 2p+1); pairs 0 .. d/4-1 (the first half) rotate by
position ids and pairs d/4 .. d/2-1 (the second half) by block position ids, pair p of
either half with frequency base^(-4 (p mod d/4) / d).

`reduce_to_structures` turns any per-element score of the parameters (|w|^2, |w * grad|)
into one score per structure by summing over every element the structure owns.
"""
from __future__ import annotations

import torch

from model.config import GLMConfig


def layer_prefix(i: int) -> str:
    return f"layers.{i}."


def split_qkv(t: torch.Tensor, config: GLMConfig):
    """Rows of a qkv weight [qkv, h] (or bias [qkv]) -> q [nq, d, ...], k [ng, d, ...],
    v [ng, d, ...] views."""
    c = config
    q, k, v = t.split([c.q_size, c.kv_size, c.kv_size], dim=0)
    nq, ng, d = c.num_attention_heads, c.multi_query_group_num, c.kv_channels
    return q.unflatten(0, (nq, d)), k.unflatten(0, (ng, d)), v.unflatten(0, (ng, d))


def pair_channels(pairs) -> list[int]:
    """Pair indices (0 .. d/2-1) -> their channels [2p, 2p+1, ...] in ascending order."""
    return [c for p in sorted(int(p) for p in pairs) for c in (2 * p, 2 * p + 1)]


def _rows(score: dict, name: str) -> torch.Tensor | None:
    """Sum a weight's per-element score over its input dim, plus its bias: [out]."""
    w = score.get(name + ".weight")
    if w is None:
        return None
    r = w.sum(dim=1) if w.ndim == 2 else w
    b = score.get(name + ".bias")
    return r + b if b is not None else r


def reduce_to_structures(score: dict[str, torch.Tensor], config: GLMConfig) -> dict:
    """Per-element scores keyed by full parameter name -> per-structure sums:

        layers [L], heads [L, nq], groups [L, ng], qk_pairs [L, ng, d/2],
        v_channels [L, ng, d], ffn [L, f], hidden [h]

    A query head owns its q rows and its dense columns; a KV group owns its K and V rows
    plus its heads; a qk pair owns its two channels in the group's K rows and in the q
    rows of the group's heads; a V channel owns that V row and the matching dense column
    of each of the group's heads; a hidden channel owns its column of every matrix that
    reads the residual stream, its row of every matrix that writes it, and its entry of
    every norm. Everything is summed in fp64 so tiny structures do not vanish."""
    c = config
    L, nq, ng, d, f, h = (c.num_layers, c.num_attention_heads, c.multi_query_group_num,
                          c.kv_channels, c.ffn_hidden_size, c.hidden_size)
    rep = nq // ng
    s = {k: v.detach().double() for k, v in score.items()}
    out = {"layers": torch.zeros(L, dtype=torch.float64),
           "heads": torch.zeros(L, nq, dtype=torch.float64),
           "groups": torch.zeros(L, ng, dtype=torch.float64),
           "qk_pairs": torch.zeros(L, ng, d // 2, dtype=torch.float64),
           "v_channels": torch.zeros(L, ng, d, dtype=torch.float64),
           "ffn": torch.zeros(L, f, dtype=torch.float64),
           "hidden": torch.zeros(h, dtype=torch.float64)}
    hid = out["hidden"]
    if "embedding.weight" in s:
        hid += s["embedding.weight"].sum(0)
    if "output_layer.weight" in s:
        hid += s["output_layer.weight"].sum(0)
    if "final_norm.weight" in s:
        hid += s["final_norm.weight"]
    for i in range(L):
        p = layer_prefix(i)
        out["layers"][i] = sum(v.sum() for k, v in s.items() if k.startswith(p))
        qkv_rows = _rows(s, p + "attention.qkv")           # [qkv]
        q, k, v = split_qkv(qkv_rows, c)                   # [nq, d], [ng, d], [ng, d]
        dense_w = s[p + "attention.dense.weight"]          # [h, nq*d]
        dense_cols = dense_w.sum(0).view(nq, d)            # [nq, d]
        heads = q.sum(1) + dense_cols.sum(1)
        out["heads"][i] = heads
        out["groups"][i] = heads.view(ng, rep).sum(1) + k.sum(1) + v.sum(1)
        q_pairs = q.view(ng, rep, d // 2, 2).sum((1, 3))   # [ng, d/2]
        out["qk_pairs"][i] = q_pairs + k.view(ng, d // 2, 2).sum(2)
        out["v_channels"][i] = v + dense_cols.view(ng, rep, d).sum(1)
        gu = _rows(s, p + "mlp.gate_up")                   # [2f]
        out["ffn"][i] = gu[:f] + gu[f:] + s[p + "mlp.down.weight"].sum(0)
        # the residual stream: read by qkv / gate_up columns, written by dense / down rows
        hid += s[p + "attention.qkv.weight"].sum(0) + s[p + "mlp.gate_up.weight"].sum(0)
        for name in ("attention.dense", "mlp.down"):
            hid += _rows(s, p + name)
        hid += s[p + "input_norm.weight"] + s[p + "post_attention_norm.weight"]
    return out
