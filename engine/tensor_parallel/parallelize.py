"""Apply tensor parallelism to a plain GLM, and map parameters between full and TP layout.

    model = GLM.build(cfg, seed=0, layer_range=..., pre_process=..., post_process=...)
    parallelize(model, tp_group, sequence_parallel=True)

The model is built and initialised whole (or as a pipeline stage) first; every TP
weight is then a slice of that full weight, so a TP model starts from exactly the
single-process values. Parameter names do not change, so checkpoint code reads full
tensors with `gather_full_state_dict` and writes a TP layout with `shard_state_dict`.

What each rank r of tp holds (the shard plan):
  attention.qkv   rows: query heads [r*nh/tp, (r+1)*nh/tp) and the KV groups they use;
                  query head h uses group h // (nh/ng), so a rank holds whole groups
                  (tp <= ng) or one group shared with tp/ng - 1 other ranks (tp > ng:
                  replicated, gradients summed over the sharers). Bias sliced alike.
  attention.dense columns of the same query heads (row-parallel); bias replicated
  mlp.gate_up     rows [gate_r | up_r]: the SwiGLU pairs stay on one rank
  mlp.down        columns of the same FFN channels (row-parallel); bias replicated
  embedding, output_layer   vocabulary rows [r*V/tp, (r+1)*V/tp)
  norms           replicated
Replicated parameters are marked `p.tp_replicated = True` (count once in a global norm);
the replicated KV rows of a shared group carry `p.tp_duplicate_range = (lo, hi)`, the
flat element range to leave out of a global norm, on every sharer but the first.
Under sequence parallelism the replicated parameters that see only a sequence shard
(norm weights, row-parallel biases) are marked `p.sequence_parallel = True` and get a
gradient hook that sums their gradient over the TP group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                           VocabParallelEmbedding, VocabParallelHead)
from engine.tensor_parallel.mappings import all_reduce_grad_hook
from engine.tensor_parallel.random import RNGTracker, TP_RNG, tp_rng_seed
from model.config import GLMConfig


def _span(lo: int, n: int) -> torch.Tensor:
    return torch.arange(lo, lo + n)


def _is(name: str, *suffixes: str) -> bool:
    """name is one of the suffixes, or ends with "." + one (a prefixed module path)."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


@dataclass(frozen=True)
class ShardPlan:
    """Which rows/columns of each full parameter tensor-parallel rank r holds."""
    config: GLMConfig
    tp: int

    def __post_init__(self):
        c, tp = self.config, self.tp
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tp={tp!r} must be a positive integer")
        nh, ng = c.num_attention_heads, c.multi_query_group_num
        if nh % tp:
            raise ValueError(f"num_attention_heads={nh} is not divisible by tp={tp}")
        if ng % tp and tp % ng:
            raise ValueError(f"multi_query_group_num={ng} and tp={tp}: one must divide the "
                             "other (each rank holds whole KV groups, or one shared group)")
        if c.ffn_hidden_size % tp:
            raise ValueError(f"ffn_hidden_size={c.ffn_hidden_size} is not divisible by tp={tp}")
        if c.padded_vocab_size % tp:
            raise ValueError(f"padded_vocab_size={c.padded_vocab_size} is not divisible by "
                             f"tp={tp}")

    # ---- per-rank pieces ----------------------------------------------------------------
    @property
    def local_heads(self) -> int:
        return self.config.num_attention_heads // self.tp

    @property
    def local_groups(self) -> int:
        return max(1, self.config.multi_query_group_num // self.tp)

    @property
    def kv_replicated(self) -> bool:
        return self.tp > self.config.multi_query_group_num

    def first_group(self, rank: int) -> int:
        c = self.config
        heads_per_group = c.num_attention_heads // c.multi_query_group_num
        return rank * self.local_heads // heads_per_group

    def kv_replica(self, rank: int) -> tuple[int, int, int] | None:
        """(first local qkv row of the KV part, group, groups) when KV rows are shared."""
        if not self.kv_replicated:
            return None
        return (self.local_heads * self.config.kv_channels, self.first_group(rank),
                self.config.multi_query_group_num)

    def kv_is_copy(self, rank: int) -> bool:
        """True when rank's KV rows are a shared group whose first holder is another rank."""
        c = self.config
        heads_per_group = c.num_attention_heads // c.multi_query_group_num
        return self.kv_replicated and (rank * self.local_heads) % heads_per_group != 0

    def index(self, name: str, rank: int) -> tuple[int, torch.Tensor] | None:
        """(dim, indices into the full tensor along dim) for rank, None if replicated."""
        c, d = self.config, self.config.kv_channels
        if _is(name, "embedding.weight", "output_layer.weight"):
            per = c.padded_vocab_size // self.tp
            return 0, _span(rank * per, per)
        if _is(name, "attention.qkv.weight", "attention.qkv.bias"):
            q = _span(rank * self.local_heads * d, self.local_heads * d)
            g = self.first_group(rank) * d
            k = c.q_size + _span(g, self.local_groups * d)
            return 0, torch.cat([q, k, k + c.kv_size])
        if _is(name, "attention.dense.weight"):
            return 1, _span(rank * self.local_heads * d, self.local_heads * d)
        f = c.ffn_hidden_size // self.tp
        if _is(name, "mlp.gate_up.weight", "mlp.gate_up.bias"):
            gate = _span(rank * f, f)
            return 0, torch.cat([gate, gate + c.ffn_hidden_size])
        if _is(name, "mlp.down.weight"):
            return 1, _span(rank * f, f)
        return None

    def shard(self, name: str, full: torch.Tensor, rank: int) -> torch.Tensor:
        spec = self.index(name, rank)
        if spec is None:
            return full.detach().clone()
        dim, idx = spec
        return full.detach().index_select(dim, idx.to(full.device))

    def merge(self, name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's piece (rank order); replicated: rank 0's."""
        if self.index(name, 0) is None:
            return pieces[0].clone()
        dim = self.index(name, 0)[0]
        shape = list(pieces[0].shape)
        shape[dim] = max(int(self.index(name, r)[1].max()) for r in range(self.tp)) + 1
        full = pieces[0].new_zeros(shape)
        for r, piece in enumerate(pieces):
            # shared KV groups are written by each sharer; the copies are equal
            full.index_copy_(dim, self.index(name, r)[1].to(full.device), piece)
        return full


# ---- full <-> TP layout -----------------------------------------------------------------

def shard_state_dict(full_tensors: dict[str, torch.Tensor], tp_rank: int, tp: int,
                     config: GLMConfig) -> dict[str, torch.Tensor]:
    """Full-name, full-shape tensors -> this rank's TP pieces under the same names (for
    loading a full checkpoint into a TP layout; load with model.load_state_dict)."""
    plan = ShardPlan(config, tp)
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank={tp_rank} is outside tp={tp}")
    return {name: plan.shard(name, t, tp_rank) for name, t in full_tensors.items()}


def gather_full_tensors(named_tensors, config: GLMConfig, tp_group) -> dict[str, torch.Tensor]:
    """(name, local tensor) pairs (parameters, or their gradients) -> full tensors, on
    every rank. Collective over tp_group: every rank passes the same names in order."""
    tp = dist.get_world_size(tp_group)
    plan = ShardPlan(config, tp)
    out = {}
    for name, t in named_tensors:
        t = t.detach().contiguous()
        if plan.index(name, 0) is None:
            out[name] = t.clone()
            continue
        pieces = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(pieces, t, group=tp_group)
        out[name] = plan.merge(name, pieces)
    return out


def gather_full_state_dict(model, tp_group) -> dict[str, torch.Tensor]:
    """A parallelized model's parameters under their full names and shapes."""
    return gather_full_tensors(model.named_parameters(), model.config, tp_group)


# ---- parallelize ------------------------------------------------------------------------

def _mark_replicated(p, group, sequence_parallel: bool):
    p.tp_replicated = True
    if sequence_parallel:
        p.sequence_parallel = True
        p.register_hook(all_reduce_grad_hook(group))


def _load(module, local: dict[str, torch.Tensor], prefix: str):
    with torch.no_grad():
        for name, p in module.named_parameters(recurse=False):
            p.copy_(local[prefix + name])
    return module


def parallelize(model, tp_group, sequence_parallel: bool = False,
                rng: RNGTracker | None = None):
    """Replace the GLM's (or pipeline stage's) layers by tensor-parallel ones holding this
    rank's slice of the current weights; in place, returns the model.

    rng: the tracker for dropout on sharded tensors; by default one seeded from
    (torch.initial_seed(), tp rank), which is correct when every TP rank seeded torch
    alike. It is kept as `model.tp_rng` (checkpoint its state_dict)."""
    if getattr(model, "tp_group", None) is not None:
        raise ValueError("parallelize: this model is already tensor-parallel")
    tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    cfg = model.config
    plan = ShardPlan(cfg, tp)
    device = next(model.parameters()).device
    if rng is None:
        rng = RNGTracker(device)
        rng.add(TP_RNG, tp_rng_seed(torch.initial_seed(), rank))
    local = shard_state_dict(model.state_dict(), rank, tp, cfg)
    sp = bool(sequence_parallel)
    kw = dict(device=device)

    for i, block in model.layers.items():
        pre = f"layers.{i}."
        attn, mlp = block.attention, block.mlp
        dtype = attn.qkv.weight.dtype
        q_rows = plan.local_heads * cfg.kv_channels
        qkv_rows = q_rows + 2 * plan.local_groups * cfg.kv_channels
        qkv = _load(ColumnParallelLinear(
            cfg.hidden_size, qkv_rows, attn.qkv.bias is not None, tp_group, sp,
            replica=plan.kv_replica(rank), dtype=dtype, **kw), local, pre + "attention.qkv.")
        dense = _load(RowParallelLinear(
            q_rows, cfg.hidden_size, attn.dense.bias is not None, tp_group, sp, dtype=dtype,
            **kw), local, pre + "attention.dense.")
        attn.use_projections(qkv, dense, plan.local_heads, plan.local_groups)
        f = cfg.ffn_hidden_size // tp
        mlp.gate_up = _load(ColumnParallelLinear(
            cfg.hidden_size, 2 * f, mlp.gate_up.bias is not None, tp_group, sp, dtype=dtype,
            **kw), local, pre + "mlp.gate_up.")
        mlp.down = _load(RowParallelLinear(
            f, cfg.hidden_size, mlp.down.bias is not None, tp_group, sp, dtype=dtype, **kw),
            local, pre + "mlp.down.")
        if plan.kv_is_copy(rank):
            # KV rows [q_rows, end) duplicate another rank's: a global norm skips them here
            for p in (attn.qkv.weight, attn.qkv.bias):
                if p is not None:
                    row = p.shape[1] if p.dim() > 1 else 1
                    p.tp_duplicate_range = (q_rows * row, p.numel())
        for p in (block.input_norm.weight, block.post_attention_norm.weight,
                  attn.dense.bias, mlp.down.bias):
            if p is not None:
                _mark_replicated(p, tp_group, sp)

    if model.embedding is not None:
        old = model.embedding.weight
        model.embedding = _load(VocabParallelEmbedding(
            cfg.padded_vocab_size, cfg.hidden_size, tp_group, sp, dtype=old.dtype, **kw),
            local, "embedding.")
    if model.output_layer is not None:
        old = model.output_layer.weight
        model.output_layer = _load(VocabParallelHead(
            cfg.hidden_size, cfg.padded_vocab_size, tp_group, sp, dtype=old.dtype, **kw),
            local, "output_layer.")
        _mark_replicated(model.final_norm.weight, tp_group, sp)
    if sp:
        model.set_dropout_rng(rng.fork)  # the residual stream is a sequence shard
    model.tp_group, model.tp_rng, model.sequence_parallel = tp_group, rng, sp
    return model
