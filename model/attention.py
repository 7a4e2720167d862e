"""ChatGLM2/3 self-attention: fused QKV [all Q | K groups | V groups], GQA/MQA, GLM 2D
rotary, prefix-LM / blank-infilling masks from integer lengths, optional KV cache."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from model.config import GLMConfig
from model.parallel_protocol import mapped_input


class KVCache:
    """Preallocated per-layer keys/values [b, groups, max_len, d] for decoding.

    `length` is the number of positions filled; every layer appends the same count per
    forward, so the model advances it once per call (`advance`)."""

    def __init__(self, config: GLMConfig, batch: int, max_len: int, layer_ids, device,
                 dtype=torch.float32, num_groups: int | None = None):
        # num_groups: the KV groups this device holds (a tensor-parallel shard holds fewer)
        groups = config.multi_query_group_num if num_groups is None else num_groups
        shape = (batch, groups, max_len, config.kv_channels)
        self.k = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layer_ids}
        self.v = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layer_ids}
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [b, groups, s_new, d] -> all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len={self.max_len}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int):
        self.length += n

    def reorder(self, index: torch.Tensor):
        """Select batch rows (beam search keeps the surviving beams' histories)."""
        for i in self.k:
            self.k[i] = self.k[i].index_select(0, index)
            self.v[i] = self.v[i].index_select(0, index)


class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig, layer_number: int):
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads
        self.num_groups = config.multi_query_group_num
        self.head_dim = config.kv_channels
        self.qkv = nn.Linear(config.hidden_size, config.qkv_size, bias=config.add_qkv_bias)
        self.dense = nn.Linear(config.q_size, config.hidden_size, bias=config.add_bias_linear)

    def use_projections(self, qkv: nn.Module, dense: nn.Module, num_heads: int,
                        num_groups: int):
        """Swap in projections that hold `num_heads` query heads and `num_groups` KV groups
        (a tensor-parallel shard: whole heads and whole groups per rank); see
        model/parallel_protocol.py. forward reads the head counts from here."""
        d = self.head_dim
        if qkv.out_features != (num_heads + 2 * num_groups) * d:
            raise ValueError(f"qkv has {qkv.out_features} outputs; {num_heads} heads and "
                             f"{num_groups} KV groups of {d} need "
                             f"{(num_heads + 2 * num_groups) * d}")
        if dense.in_features != num_heads * d:
            raise ValueError(f"dense has {dense.in_features} inputs; {num_heads} heads of "
                             f"{d} need {num_heads * d}")
        self.qkv, self.dense = qkv, dense
        self.num_heads, self.num_groups = num_heads, num_groups

    def forward(self, x, cos, sin, prefix_lens=None, pad_lens=None, kv_cache=None,
                doc_starts=None):
        # x [s, b, h]; cos/sin [s, b, 1, d/2]; doc_starts: packed rows (model/masks.py)
        mode = self.config.kernels
        qkv = self.qkv(x)
        # sizes from the projection: a sequence-parallel qkv takes [s/tp, b, h] and returns
        # the whole sequence
        s, b = qkv.shape[:2]
        # this module's heads and groups: a tensor-parallel shard holds fewer than the config
        d, nq, nkv = self.head_dim, self.num_heads, self.num_groups
        q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
        q = ops.apply_rotary(q.view(s, b, nq, d), cos, sin, mode)
        k = ops.apply_rotary(k.view(s, b, nkv, d), cos, sin, mode)
        v = v.view(s, b, nkv, d)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        q_offset = 0
        if kv_cache is not None:
            q_offset = kv_cache.length
            k, v = kv_cache.update(self.layer_number, k, v)
        ctx = ops.attention(q, k, v, prefix_lens, pad_lens, q_offset, mode,
                            doc_starts=doc_starts)  # [b, nq, s, d]
        ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, nq * d)
        return self.dense(ctx)


class MLP(nn.Module):
    """SwiGLU: one h -> 2*ffn projection laid out [gate | up], then ffn -> h."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size,
                                 bias=config.add_bias_linear)
        self.down = nn.Linear(config.ffn_hidden_size, config.hidden_size,
                              bias=config.add_bias_linear)

    def forward(self, x):
        if self.gate_up.bias is not None:
            act = ops.swiglu(self.gate_up(x), self.config.kernels)
        else:
            # the fused op multiplies gate_up.weight itself: a tensor-parallel gate_up maps
            # x into its region first (model/parallel_protocol.py, MapsInput)
            act = ops.swiglu_linear(mapped_input(self.gate_up, x), self.gate_up.weight,
                                    self.config.kernels)
        return self.down(act)


def dropout(x, p, training, rng=contextlib.nullcontext):
    """rng: a context manager factory choosing the generator the mask is drawn from (the
    default one unless tensor parallelism shards x; see engine/tensor_parallel/random.py)."""
    if not (p > 0 and training):
        return x
    with rng():
        return F.dropout(x, p, training)
