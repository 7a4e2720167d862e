"""The GLM: embedding, ChatGLM2/3 blocks, final RMSNorm, untied output head.

Pipeline-friendly by construction: a GLM may hold only a contiguous range of layers
(`layer_range`), keyed by their global index, with the embedding only on the first stage
(`pre_process`) and the norm + head only on the last (`post_process`). Parameter names
are therefore the same in every layout, which is what makes checkpoints layout-free.
Weights are initialised per parameter from (seed, global name), so any slice of the
model starts from exactly the single-process values.
"""
from __future__ import annotations

import contextlib
import math
import zlib

import torch
from torch import nn

from kernels import ops
from kernels.reference import rotary_angles
from model.attention import MLP, KVCache, SelfAttention, dropout
from model.config import GLMConfig
from model.parallel_protocol import LossHead


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, mode: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.mode = mode

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps, self.mode)


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig, layer_number: int):
        super().__init__()
        self.config = config
        self.input_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon, config.kernels)
        self.attention = SelfAttention(config, layer_number)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon,
                                           config.kernels)
        self.mlp = MLP(config)
        # where residual dropout draws its masks: the default generator, unless the
        # residual stream is sharded (GLM.set_dropout_rng)
        self.dropout_rng = contextlib.nullcontext

    def forward(self, x, cos, sin, prefix_lens=None, pad_lens=None, kv_cache=None,
                doc_starts=None):
        # x [s, b, h]; pre-norm residual block
        c = self.config
        attn = self.attention(self.input_norm(x), cos, sin, prefix_lens, pad_lens, kv_cache,
                              doc_starts)
        attn = dropout(attn, c.hidden_dropout, self.training, self.dropout_rng)
        # fused: x + attn, and the post-attention norm of that sum
        x, normed = ops.add_rms_norm(attn, x, self.post_attention_norm.weight,
                                     c.layernorm_epsilon, c.kernels)
        return x + dropout(self.mlp(normed), c.hidden_dropout, self.training, self.dropout_rng)


class GLM(nn.Module):
    def __init__(self, config: GLMConfig, layer_range: tuple[int, int] | None = None,
                 pre_process: bool = True, post_process: bool = True):
        super().__init__()
        self.config = config
        start, end = layer_range if layer_range is not None else (0, config.num_layers)
        if not 0 <= start < end <= config.num_layers:
            raise ValueError(f"layer_range={layer_range} is outside 0..{config.num_layers}")
        self.layer_range = (start, end)
        self.pre_process, self.post_process = pre_process, post_process
        self.embedding = (nn.Embedding(config.padded_vocab_size, config.hidden_size)
                          if pre_process else None)
        self.layers = nn.ModuleDict({str(i): GLMBlock(config, i) for i in range(start, end)})
        if post_process:
            self.final_norm = RMSNorm(config.hidden_size, config.layernorm_epsilon, config.kernels)
            self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size,
                                          bias=False)
        else:
            self.final_norm = self.output_layer = None
        self.dropout_rng = contextlib.nullcontext  # embedding dropout; see set_dropout_rng

    # ---- construction ----------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0):
        """Normal(0, init_std) for matrices, output projections scaled by
        1/sqrt(2 * num_layers) (GPT-2), ones for norms, zeros for biases. Each tensor draws
        from its own generator seeded by (seed, name): layout-independent init."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                scale = std / math.sqrt(2 * self.config.num_layers) if name.endswith(
                    ("attention.dense.weight", "mlp.down.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * scale)
        return self

    @classmethod
    def build(cls, config: GLMConfig, seed: int = 0, device="cpu", **kwargs) -> "GLM":
        """Allocate on `device` without a throwaway default init, then init_weights."""
        with torch.device("meta"):
            model = cls(config, **kwargs)
        model.to_empty(device=device)
        return model.init_weights(seed)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            for m in (self.embedding, self.output_layer):
                if m is not None:
                    n -= m.weight.numel()
        return n

    def set_dropout_rng(self, rng):
        """rng: a context manager factory for the residual and embedding dropout masks
        (sequence parallelism shards the residual stream, so each rank draws its own; see
        model/parallel_protocol.py)."""
        self.dropout_rng = rng
        for layer in self.layers.values():
            layer.dropout_rng = rng

    # ---- forward ---------------------------------------------------------------------
    def hidden(self, input_ids=None, *, hidden_states=None, position_ids=None,
               block_position_ids=None, prefix_lens=None, pad_lens=None,
               kv_cache: KVCache | None = None, doc_starts=None) -> torch.Tensor:
        """This stage's layers: input_ids [b, s] on the first stage, hidden_states
        [s, b, h] on later ones -> hidden states [s, b, h]; on the final stage after the
        final norm, i.e. what the head reads (`logits`, `head_loss`).
        Packed rows (several examples per row) add doc_starts [b, s] and give prefix_lens
        per token [b, s]; see model/masks.py `pack`."""
        c = self.config
        if self.pre_process:
            b, s = input_ids.shape
            x = self.embedding(input_ids).transpose(0, 1)  # [s, b, h]
            # embedding dropout belongs to the first stage only: a later stage's input has
            # already been through it
            x = dropout(x, c.hidden_dropout, self.training, self.dropout_rng)
        else:
            s, b = hidden_states.shape[:2]
            x = hidden_states
        if position_ids is None:
            start = kv_cache.length if kv_cache is not None else 0
            position_ids = torch.arange(start, start + s, device=x.device).expand(b, s)
        if prefix_lens is not None and prefix_lens.dim() == 2 and doc_starts is None:
            raise ValueError("per-token prefix_lens [b, s] come from packed rows: pass their "
                             "doc_starts too, or documents would attend to each other")
        if c.causal:
            # the layout is a property of the weights: a causal-1D model never sees a
            # bidirectional prefix or a rotated second half, whatever a batch carries
            prefix_lens = block_position_ids = None
        cos, sin = rotary_angles(position_ids, block_position_ids, c.kv_channels, c.rope_base,
                                 c.rope_position_scale)
        # [b, s, d/2] -> [s, b, 1, d/2], broadcast over heads
        cos, sin = (t.transpose(0, 1).unsqueeze(2) for t in (cos, sin))
        for layer in self.layers.values():
            x = layer(x, cos, sin, prefix_lens, pad_lens, kv_cache, doc_starts)
        if kv_cache is not None:
            kv_cache.advance(s)
        return self.final_norm(x) if self.post_process else x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [s, b, h] -> logits [b, s, vocab] fp32 (final stage)."""
        return self.output_layer(h).transpose(0, 1).float()

    def head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Final hidden states [s, b, h], labels [b, s] -> per-token losses [b, s] fp32, 0
        where the label is -100, so that the caller decides how to average. The logits are
        never formed whole."""
        b = labels.shape[0]
        flat = h.reshape(-1, h.shape[-1])  # [s*b, h]: seq-major, no transpose copy
        labels = labels.transpose(0, 1).reshape(-1)  # [s*b], matching flat's order
        head = self.output_layer
        if isinstance(head, LossHead):   # a vocab-sharded head; model/parallel_protocol.py
            loss = head.loss(flat, labels)
        else:
            loss = ops.linear_cross_entropy(flat, head.weight, labels, mode=self.config.kernels)
        return loss.view(-1, b).transpose(0, 1)  # [b, s]

    def forward(self, input_ids=None, *, labels=None, logits_to_keep: int = 0, **inputs):
        """The stage's output: `hidden(input_ids, **inputs)`, then on the final stage the
        head: per-token losses [b, s] with labels (`head_loss`), else logits [b, s, vocab]
        (`logits`), or only the last `logits_to_keep` columns' [b, k, vocab] (a prompt's
        prefill reads one). A caller that needs the final hidden states, or the logits for
        more than one loss, calls `hidden` and the head itself."""
        h = self.hidden(input_ids, **inputs)
        if not self.post_process:
            return h
        if labels is not None:
            return self.head_loss(h, labels)
        return self.logits(h[-logits_to_keep:] if logits_to_keep > 0 else h)

    def new_kv_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        p = next(self.parameters())
        # the KV groups this device holds (a tensor-parallel shard holds fewer)
        groups = next(iter(self.layers.values())).attention.num_groups
        return KVCache(self.config, batch, max_len, [int(k) for k in self.layers.keys()],
                       p.device, dtype or p.dtype, num_groups=groups)
