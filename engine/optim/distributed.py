"""DistributedOptimizer: data-parallel gradient reduction, ZeRO 0/1/2, fp32 master weights
for bf16/fp16 models, dynamic loss scaling, global gradient-norm clipping, AdamW.

    opt = DistributedOptimizer(model.named_parameters(), OptimConfig(zero_stage=2),
                               dp_group=dims.dp_group, model_parallel_group=dims.mp_group)
    for i, mb in enumerate(microbatches):          # (the pipeline schedule does this)
        with opt.no_sync() if i < len(microbatches) - 1 else contextlib.nullcontext():
            opt.scale_loss(loss_of(mb)).backward()  # loss already / global label count
    grad_norm, skipped = opt.step(lr)               # also zeroes the gradients

Construction takes over the parameters' storage: every parameter becomes a view into one
flat buffer in the training dtype (cast from its current values; the fp32 master copy is
taken before the cast), so the ZeRO all-gather writes straight into the model. Build the
optimizer after tensor parallelism has replaced and marked the parameters.

Data layout (see layout.py): parameters laid out in reverse order in one flat space;
gradient buckets are contiguous ranges of it, each padded to a multiple of dp, and each dp
rank owns the r-th equal slice of every bucket (ZeRO 1/2: S elements of fp32 master
weights and moments in all) or all of it (ZeRO 0). Gradients are reduce-scattered and
parameters all-gathered one bucket at a time.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from engine.optim import collectives, state as state_lib
from engine.optim.adamw import adamw_
from engine.optim.config import OptimConfig
from engine.optim.grad_buckets import GradBuckets
from engine.optim.layout import FlatLayout, intersect
from engine.optim.loss_scale import DynamicLossScaler

_NORM_CHUNK = 1 << 22


class StepResult(NamedTuple):
    grad_norm: float        # global L2 norm before clipping, unscaled; equal on every rank
    skipped: bool           # True when the gradients held inf/nan (on any rank)


def _named_params(params) -> list[tuple[str, torch.nn.Parameter]]:
    if isinstance(params, torch.nn.Module):
        items = list(params.named_parameters())
    else:
        items = list(params)
        if items and not isinstance(items[0], tuple):
            items = [(str(i), p) for i, p in enumerate(items)]
    items = [(n, p) for n, p in items if p.requires_grad]
    if not items:
        raise ValueError("params: no trainable parameters to optimize")
    if len({id(p) for _, p in items}) != len(items):
        raise ValueError("params: the same parameter is listed twice")
    if len({n for n, _ in items}) != len(items):
        raise ValueError("params: parameter names are not unique")
    devices = {p.device for _, p in items}
    if len(devices) > 1:
        raise ValueError(f"params: all parameters must be on one device, got {devices}")
    return items


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class DistributedOptimizer:
    def __init__(self, params, cfg: OptimConfig, dp_group=None, model_parallel_group=None,
                 tp_rank: int = 0):
        """params: a module, (name, param) pairs, or params. dp_group: ranks holding the
        same piece of the model (None: no data parallelism). model_parallel_group: the
        pp x tp ranks of this replica, for the global norm and the inf check (None: the
        whole model is here). tp_rank: this rank's tensor-parallel index; parameters
        marked `p.tp_replicated = True` count in the norm only on tp rank 0."""
        named = _named_params(params)
        self.cfg = cfg
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.dp_group, self.mp_group = dp_group, model_parallel_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        # ZeRO 0 is one "shard" holding everything, updated identically on every rank
        self.shard_world = self.dp_size if cfg.zero_stage > 0 else 1
        self.shard_rank = self.dp_rank if cfg.zero_stage > 0 else 0
        itemsize = torch.empty((), dtype=cfg.reduce_dtype).element_size()
        self.layout = FlatLayout([(n, tuple(p.shape)) for n, p in named],
                                 bucket_numel=max(1, int(cfg.bucket_mb * 2 ** 20) // itemsize),
                                 shard_world=self.shard_world)
        self.device = self.params[0].device
        self._flat_ranges = self.layout.shard_flat_ranges(self.shard_rank)
        self._segments = self.layout.param_segments(self.shard_rank)
        self.step_count = 0
        self.scaler = (DynamicLossScaler(cfg.initial_loss_scale, cfg.min_loss_scale,
                                         cfg.growth_interval)
                       if cfg.precision == "fp16" else None)
        self._build_buffers()
        self._decay_ranges = self._ranges(
            lambda slot: cfg.decay_1d_params or len(slot.shape) >= 2)
        self._norm_ranges = self._count_once_ranges(tp_rank)
        self.grads = GradBuckets(self.params, self.layout, cfg.reduce_dtype, dp_group,
                                 self.shard_rank, self.dp_size, scatter=cfg.zero_stage == 2)

    @torch.no_grad()
    def _build_buffers(self):
        S, dtype = self.layout.shard_size, self.cfg.param_dtype
        self.param_buffer = torch.zeros(self.layout.total, dtype=dtype, device=self.device)
        # fp32 models need no separate master: the shard of the parameter buffer is it, as
        # one view when the shard is one flat range (else master_view maps each piece)
        self._alias = dtype == torch.float32
        if not self._alias:
            self.master = torch.zeros(S, dtype=torch.float32, device=self.device)
            for slot, plo, phi, slo in self._segments:  # before the cast loses the bits
                self.master[slo:slo + phi - plo] = \
                    self.params[slot.index].detach().reshape(-1)[plo:phi]
        for slot, p in zip(self.layout.slots, self.params):
            view = self.param_buffer[slot.offset:slot.end]
            view.copy_(p.detach().reshape(-1))
            p.data = view.view(slot.shape)
            p.grad = None
        if self._alias:
            self.master = (self.param_buffer[self._flat_ranges[0][0]:self._flat_ranges[0][1]]
                           if len(self._flat_ranges) == 1 else None)
        self.exp_avg = torch.zeros(S, dtype=torch.float32, device=self.device)
        self.exp_avg_sq = torch.zeros(S, dtype=torch.float32, device=self.device)

    def _ranges(self, keep) -> list[tuple[int, int]] | None:
        """Shard-local ranges of the parameters `keep` selects; None when it selects all
        (padding is zero everywhere, so including it changes nothing and saves ops)."""
        kept = [(slo, slo + phi - plo) for slot, plo, phi, slo in self._segments if keep(slot)]
        if len(kept) == len(self._segments):
            return None
        return _merge(kept)

    def _count_once_ranges(self, tp_rank: int) -> list[tuple[int, int]] | None:
        """Shard-local ranges that enter the global grad norm, so that every gradient
        element of the model is counted once across tensor-parallel ranks: a parameter
        replicated over TP (`tp_replicated`) only on tp rank 0, and the rows of a KV group
        that several TP ranks hold (`tp_duplicate_range`, flat [lo, hi) of the local
        tensor) only on the first holder."""
        kept, dropped = [], False
        for slot, plo, phi, slo in self._segments:
            p = self.params[slot.index]
            if tp_rank != 0 and getattr(p, "tp_replicated", False):
                dropped = True
                continue
            dup = getattr(p, "tp_duplicate_range", None)
            pieces = [(plo, phi)]
            if dup is not None:
                lo, hi = dup
                pieces = [(a, b) for a, b in ((plo, min(phi, lo)), (max(plo, hi), phi))
                          if a < b]
                dropped = True
            kept += [(slo + a - plo, slo + b - plo) for a, b in pieces]
        return _merge(kept) if dropped else None

    @staticmethod
    def _local(ranges, slo: int, shi: int) -> list[tuple[int, int]] | None:
        """`ranges` (shard-local) cut to the piece [slo, shi), made piece-local."""
        if ranges is None:
            return None
        cuts = (intersect(lo, hi, slo, shi) for lo, hi in ranges)
        return [(a - slo, b - slo) for a, b in filter(None, cuts)]

    # ---- the training-loop API ---------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Multiply by the fp16 loss scale before backward (identity otherwise)."""
        return loss * self.scaler.scale if self.scaler is not None else loss

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate locally; the reduction waits for a backward
        outside (the last microbatch)."""
        previous, self.grads.sync_enabled = self.grads.sync_enabled, False
        try:
            yield
        finally:
            self.grads.sync_enabled = previous

    def close(self):
        """Remove the gradient hooks, e.g. before another optimizer takes these params
        (they stay views of this one's param_buffer)."""
        self.grads.remove_hooks()

    def zero_grad(self):
        """Drop the accumulated gradients (step() already does this)."""
        self.grads.reset()
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float | None = None) -> StepResult:
        """Wait for the gradient reduction, unscale, check for inf/nan on every rank,
        clip to max_grad_norm, AdamW on this rank's shard, all-gather the parameters,
        zero the gradients. A step with inf/nan gradients changes nothing but the fp16
        loss scale (and is skipped in bf16/fp32 too, rather than poisoning the weights)."""
        cfg = self.cfg
        lr = cfg.lr if lr is None else float(lr)
        self.grads.finish()
        inv_scale = 1.0 / self.loss_scale
        pieces = []
        for g, slo, shi in self.grads.shard_grads():
            g = g if g.dtype == torch.float32 else g.float()   # fp32 for the update
            if inv_scale != 1.0:
                g.mul_(inv_scale)
            pieces.append((g, slo, shi))
        grad_norm = self._global_norm(pieces)
        if not math.isfinite(grad_norm):
            self._finish_step(found_inf=True)
            return StepResult(grad_norm, True)
        # torch.nn.utils.clip_grad_norm_'s rule, applied to the shard
        coef = 1.0
        if cfg.max_grad_norm > 0:
            coef = min(1.0, cfg.max_grad_norm / (grad_norm + 1e-6))
        self.step_count += 1
        beta1, beta2 = cfg.betas
        for g, slo, shi in pieces:
            if coef != 1.0:
                g.mul_(coef)
            adamw_(self.master_view(slo, shi), g, self.exp_avg[slo:shi],
                   self.exp_avg_sq[slo:shi], step=self.step_count, lr=lr, beta1=beta1,
                   beta2=beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                   decay_ranges=self._local(self._decay_ranges, slo, shi))
        self._publish_params()
        self._finish_step(found_inf=False)
        return StepResult(grad_norm, False)

    def _finish_step(self, found_inf: bool):
        if self.scaler is not None:
            self.scaler.update(found_inf)
        self.grads.reset()

    def master_view(self, slo: int, shi: int) -> torch.Tensor:
        """The fp32 master weights of shard-local [slo, shi) (within one bucket's slice)."""
        if self.master is not None:
            return self.master[slo:shi]
        for lo, hi, s0 in self._flat_ranges:   # fp32 alias over several bucket slices
            if s0 <= slo and shi <= s0 + hi - lo:
                return self.param_buffer[lo + slo - s0:lo + shi - s0]
        raise AssertionError(f"shard range [{slo}, {shi}) crosses a bucket slice")

    def _shard(self, key: str) -> torch.Tensor:
        """This rank's whole shard of a state tensor (a copy for a sliced fp32 alias)."""
        t = getattr(self, key)
        if t is None:
            t = torch.cat([self.param_buffer[lo:hi] for lo, hi, _ in self._flat_ranges])
        return t

    def _gather_flat(self, shard: torch.Tensor, out: torch.Tensor):
        """Every dp rank's shard -> the flat [total] `out`: one all_gather_into_tensor per
        bucket (a bucket is every rank's slice of it, in rank order), all in flight at
        once. `shard` must not alias `out`."""
        works = [collectives.all_gather(out[self.layout.buckets[b].start:
                                            self.layout.buckets[b].end],
                                        shard[slo:shi], self.dp_group)
                 for b, _, _, slo, shi in self.layout.shard_pieces(self.shard_rank)]
        for w in works:
            w.wait()

    def _global_norm(self, pieces) -> float:
        """sqrt of the sum of squares of every gradient element of the model, each counted
        once: this rank's shard only (the other dp ranks count theirs), tp-replicated
        parameters only on tp rank 0; then summed over dp and over the model-parallel
        ranks. inf/nan anywhere makes it non-finite everywhere: that is the agreed
        overflow check, in one scalar all-reduce per group."""
        views = []
        for g, slo, shi in pieces:
            ranges = self._local(self._norm_ranges, slo, shi)
            for a, b in [(0, shi - slo)] if ranges is None else ranges:
                views += g[a:b].split(_NORM_CHUNK)
        # fp64 sums: an fp32 norm over millions of elements is off by ~1e-6, enough to make
        # shard layouts disagree. One foreach call for every piece (on CUDA a few fused
        # launches); the chunks only bound the fp64 copy CPU makes of each
        norms = torch._foreach_norm(views, 2, dtype=torch.float64) if views else []
        acc = (torch.stack(norms).square().sum() if views
               else torch.zeros((), dtype=torch.float64, device=self.device))
        if self.shard_world > 1:
            dist.all_reduce(acc, group=self.dp_group)
        if self.mp_group is not None:
            dist.all_reduce(acc, group=self.mp_group)
        return math.sqrt(acc.item())

    @torch.no_grad()
    def _publish_params(self):
        """Master shard -> model dtype -> every dp rank's model."""
        if self.shard_world > 1:   # the gather writes this rank's slices too
            # its input must not alias the output: a copy (the sliced alias's is one already)
            mine = (self._shard("master") if self.master is None
                    else self.master.to(self.param_buffer.dtype, copy=True))
            self._gather_flat(mine, self.param_buffer)
        elif not self._alias:
            self.param_buffer.copy_(self.master)

    # ---- inspection --------------------------------------------------------------------
    @torch.no_grad()
    def full_grads(self) -> dict[str, torch.Tensor]:
        """Reduced, unscaled, unclipped gradients per parameter name (fp32). Call after the
        last backward and before step(); collective under ZeRO 2. For tests and debugging."""
        flat = self.grads.full_flat() / self.loss_scale
        return {s.name: flat[s.offset:s.end].view(s.shape).clone() for s in self.layout.slots}

    def state_bytes(self) -> dict[str, int]:
        """Optimizer memory on this rank: fp32 master weights (0 when the fp32 model's own
        buffer serves), AdamW moments, and the gradients held at step time, in the reduce
        dtype (all buckets under ZeRO 0/1, this rank's shard under ZeRO 2). Not counted:
        under ZeRO 2 the full buckets still exist while microbatches accumulate (they are
        freed after the reduce-scatter), and step() makes a transient fp32 copy of 16-bit
        gradient shards."""
        S = self.layout.shard_size
        out = {"master": 0 if self._alias else S * 4, "exp_avg": S * 4, "exp_avg_sq": S * 4,
               "grads": self.grads.bytes_held()}
        out["total"] = sum(out.values())
        return out

    # ---- checkpoints -------------------------------------------------------------------
    def _scalars(self) -> dict:
        out = {"step": self.step_count, "loss_scale": self.loss_scale, "clean_steps": 0,
               "precision": self.cfg.precision}
        if self.scaler is not None:
            out["clean_steps"] = self.scaler.clean_steps
        return out

    def state_dict(self) -> dict:
        """This rank's shard: {"meta": JSON-able layout + scalars, "master", "exp_avg",
        "exp_avg_sq": fp32 [S]}. Any set of all old ranks' dicts loads onto any dp size
        and ZeRO stage (load_state_dict)."""
        ranges = self._flat_ranges
        # one flat range keeps the original "shard" form; slices of several buckets list
        # their (flat lo, flat hi, shard-local lo) as "pieces"
        where = ({"shard": [ranges[0][0], ranges[0][1]]} if len(ranges) == 1
                 else {"pieces": [list(r) for r in ranges]})
        meta = {"format": state_lib.FORMAT, "zero_stage": self.cfg.zero_stage,
                "dp_size": self.dp_size, "dp_rank": self.dp_rank, **where,
                "total": self.layout.total,
                "params": self.layout.describe(), **self._scalars()}
        return {"meta": meta, "master": self._shard("master").detach().clone(),
                "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone()}

    @torch.no_grad()
    def full_state(self) -> dict:
        """Layout-free state (collective over dp): {"params": {name: {"master",
        "exp_avg", "exp_avg_sq": fp32 tensors of the parameter's shape}}, "step",
        "loss_scale", "clean_steps", "precision"}. What the trainer saves per parameter
        name."""
        flats = {}
        for key in state_lib.KEYS:
            shard = self._shard(key)
            if self.shard_world > 1:
                flat = torch.empty(self.layout.total, dtype=torch.float32, device=self.device)
                self._gather_flat(shard, flat)
            else:
                flat = shard
            flats[key] = flat
        params = {s.name: {k: flats[k][s.offset:s.end].view(s.shape).clone() for k in flats}
                  for s in self.layout.slots}
        return {"params": params, **self._scalars()}

    @torch.no_grad()
    def load_state_dict(self, state):
        """Load from this optimizer's `full_state()` format, or from one shard dict / the
        list of every old rank's shard dicts (any dp size, any ZeRO stage). Collective:
        every dp rank calls it. Parameters are reset to the loaded master weights."""
        source = state_lib.make_source(state)
        source.check_params([(s.name, s.shape) for s in self.layout.slots])
        for key in state_lib.KEYS:
            if key == "master" and self.master is None:
                for lo, hi, _ in self._flat_ranges:
                    self.param_buffer[lo:hi].zero_()
            else:
                getattr(self, key).zero_()
        for slot, plo, phi, slo in self._segments:
            for key in state_lib.KEYS:
                dst = (self.master_view(slo, slo + phi - plo) if key == "master"
                       else getattr(self, key)[slo:slo + phi - plo])
                dst.copy_(source.read(key, slot.name, plo, phi))
        scalars = source.scalars
        self.step_count = int(scalars["step"])
        # a loss scale saved by a bf16/fp32 run (always 1.0) would make fp16 underflow:
        # keep the configured initial scale then
        if (self.scaler is not None and "loss_scale" in scalars
                and scalars.get("precision", "fp16") == "fp16"):
            self.scaler.load_state_dict(scalars)
        self._publish_params()
        self.zero_grad()
