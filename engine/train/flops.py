"""Model FLOPs per token, the convention of the Megatron / PaLM MFU papers: 6 FLOPs per
weight per token for forward + backward (embedding lookups excluded, the output head
included) plus the attention score and context matmuls, 12 * layers * seq * (heads * d)."""
from __future__ import annotations

from model.config import GLMConfig


def matmul_params(cfg: GLMConfig) -> int:
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    per_layer = h * cfg.qkv_size + cfg.q_size * h + h * 2 * f + f * h
    return cfg.num_layers * per_layer + h * cfg.padded_vocab_size


def train_flops_per_token(cfg: GLMConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * seq_len * cfg.q_size


def head_flops_per_token(cfg: GLMConfig) -> float:
    """The output head's share of train_flops_per_token (its projection's weights)."""
    return 6.0 * cfg.hidden_size * cfg.padded_vocab_size


def layer_flops_per_token(cfg: GLMConfig, seq_len: int) -> float:
    """One transformer layer's share: the rest, split equally over the layers."""
    return (train_flops_per_token(cfg, seq_len) - head_flops_per_token(cfg)) / cfg.num_layers


def forward_flops_per_token(cfg: GLMConfig, seq_len: int) -> float:
    return train_flops_per_token(cfg, seq_len) / 3.0
