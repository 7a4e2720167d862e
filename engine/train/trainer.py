"""The one training loop that pretrain, distill and finetune share.

Per optimizer step, on every rank of any tp x pp x dp layout:
  this data-parallel rank's microbatches
  -> engine.pipeline.schedules.forward_backward (gradient accumulation when pp == 1, else the
     pipeline schedule), with the data-parallel reduction deferred to the last microbatch
  -> DistributedOptimizer.step: global-norm clipping, AdamW, ZeRO all-gather
  -> log / eval / checkpoint.
Losses are token-weighted over the whole global batch (each microbatch's summed token
loss is divided by the global label count), so every layout reproduces the
single-process numbers.

Batches are a pure function of (seed, index) (engine/recipe/data/datasets.py): step t uses global
microbatches t*m*dp ... (t+1)*m*dp - 1, dp rank r the r-th run of m of them. The data
position is just the step count, so `--resume` continues bitwise on CPU.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.config import RunConfig
from engine.train import checkpointing
from engine.train.build import Parts, build_parts
from engine.train.divergence import DivergenceGuard
from engine.train.flops import train_flops_per_token
from engine.train.metrics import TrainMetrics
from engine.parallel.monitor import step_guard
from engine.train.run_dir import CheckpointStore
from engine.train.profiling import StepProfiler
from engine.pipeline.schedules import StepContext, forward_backward
from engine.pipeline.stage import glm_forward_step
from engine.train.stop import active as active_stop
from engine.timing import Clock


def lr_at(step: int, cfg) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def count_tokens(microbatches: list[dict]) -> int:
    return int(sum((mb["labels"] != -100).sum().item() for mb in microbatches))


def real_tokens(microbatches: list[dict], pad_id: int | None) -> int:
    """Input tokens that are not padding (all of them when the pad id is unknown)."""
    if pad_id is None:
        return sum(int(mb["input_ids"].numel()) for mb in microbatches)
    return int(sum((mb["input_ids"] != pad_id).sum().item() for mb in microbatches))


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int       # real (non-padding) input tokens of the whole job this step
    seconds: float    # device time (engine.timing.Clock)
    skipped: bool = False
    backoff: bool = False   # skipped as an fp16 loss-scale back-off (not divergence)


class Trainer:
    """Trains built parts (engine.train.build.Parts: this rank's chunks, P2P, optimizer)
    on train_data; `Trainer.from_config` builds them from the config first.

    forward_step(chunk, batch, hidden, side) -> per-token loss on the last stage (any
    layout; default engine.pipeline.schedules.glm_forward_step).
    Two hooks, each called on every rank at the same point, so they may hold collectives:
    before_step(microbatches) runs before each training forward/backward (distillation
    runs a pipelined teacher over the same microbatches there); log_terms() -> {name:
    float} adds values to each log line and metrics record (distillation's per-term
    means, reduced over the job).
    extra_files: {name in the checkpoint: source path} written inside every checkpoint's
    atomic save and hashed with it (the runners pass the tokenizer).

    The step API (each call collective over the layout, on every rank):
      forward_backward(microbatches) -> loss   forwards and backwards, gradients kept
      forward_loss(microbatches) -> loss       forwards only, dropout off
      optimizer_step(lr) -> StepResult         clip, AdamW, ZeRO gather; step unchanged
      train_step() -> StepStats                the next step's batches, both of the
                                               above, and the step counter moves
    Checkpoints: save / resume (engine/train/checkpointing.py)."""

    def __init__(self, cfg: RunConfig, parts: Parts, train_data, dev_data=None, *,
                 tokenizer_sha256: str | None = None, log=print,
                 extra_meta: dict | None = None, forward_step=None, before_step=None,
                 log_terms=None, extra_files: dict | None = None):
        state = parts.state
        self.cfg, self.state, self.parts = cfg, state, parts
        self.extra_files = dict(extra_files or {})
        self.train_data, self.dev_data = train_data, dev_data
        self.tokenizer_sha256 = tokenizer_sha256
        self.extra_meta = extra_meta or {}
        tc, pc = cfg.train, cfg.parallel
        self.rank = state.rank
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.pp, self.dp, self.tp = state.dims.pp, state.dims.dp, state.dims.tp
        self.dp_rank, self.stage, self.tp_rank = state.coords.dp, state.coords.pp, state.coords.tp
        self.device, self.chunks = parts.device, parts.chunks
        self.aux_modules = parts.aux_modules
        self.precision, self.autocast_dtype = parts.precision, parts.autocast_dtype
        self.comm, self.optimizer = parts.comm, parts.optimizer
        self.forward_step = forward_step or glm_forward_step
        self.before_step, self.log_terms = before_step, log_terms
        self.schedule = pc.schedule if self.pp > 1 else "none"
        self.step = 0
        self.flops_per_token = train_flops_per_token(cfg.model, tc.seq_len)
        self._real_tokens = 0
        if self.rank == 0:
            os.makedirs(tc.out_dir, exist_ok=True)
        self.metrics = TrainMetrics(cfg, rank=self.rank, log=self.log, device=self.device,
                                    devices=self.dp * self.tp * self.pp,
                                    flops_per_token=self.flops_per_token)
        self.metrics_path = self.metrics.path
        self.guard = DivergenceGuard(tc.max_skipped_steps, tc.loss_spike_factor)
        self.store = CheckpointStore(tc.out_dir, tc.keep_checkpoints, log=self.log)
        self.saved_step: int | None = None    # the step of the last managed save

    @classmethod
    def from_config(cls, cfg: RunConfig, train_data, dev_data=None, *, state=None,
                    device=None, model=None, aux_modules: dict | None = None, mp_group=None,
                    tokenizer_sha256: str | None = None, **kw) -> "Trainer":
        """Build the parts (engine.train.build.build_parts: state None for one process,
        on `device`; `model` a ready whole GLM, single stage only; aux_modules trained
        beside it, saved as "aux.<name>.*"; mp_group for the global gradient norm),
        then a Trainer over them; `kw` goes to __init__."""
        parts = build_parts(cfg, state, device=device, model=model, aux_modules=aux_modules,
                            mp_group=mp_group, tokenizer_sha256=tokenizer_sha256)
        return cls(cfg, parts, train_data, dev_data, tokenizer_sha256=tokenizer_sha256, **kw)

    # ---- pieces ----------------------------------------------------------------------
    @property
    def model(self):
        """The whole model (single-stage runs); stage 0's first chunk otherwise."""
        return self.chunks[0]

    def named_trained_parameters(self):
        """The optimizer's parameters: the chunks', then "aux.<name>"."""
        return self.parts.named_trained_parameters()

    def autocast(self):
        """The context each forward runs under (bf16 autocast on CUDA with "auto")."""
        return self.parts.autocast()

    def _global_count(self, n: int, *more: int):
        """Sums over data parallel, in one all-reduce (n alone: an int; else a list)."""
        if self.dp > 1:
            t = torch.tensor([n, *more], dtype=torch.long, device=self.device)
            dist.all_reduce(t, group=self.state.dp_group)
            n, *more = (int(x) for x in t.tolist())
        return [n, *more] if more else n

    def microbatches(self, data, step: int) -> list[dict]:
        tc = self.cfg.train
        m = tc.num_microbatches
        base = step * m * self.dp + self.dp_rank * m
        return [data.get_batch(base + i, tc.micro_batch_size) for i in range(m)]

    # ---- the step API ----------------------------------------------------------------
    def forward_backward(self, mbs: list[dict], *, forward_only: bool = False, stats=None,
                         meter=None) -> float:
        """This dp rank's microbatches of one step through the schedule: forwards and
        backwards, gradients accumulated (reduced over dp at the last microbatch, scaled
        for fp16), the optimizer not stepped. -> the loss, token-weighted over the global
        batch (every rank's label tokens), the same on every rank. forward_only: no
        gradients, no before_step hook. stats: an engine.pipeline.schedules.ScheduleStats
        to fill; meter: a SavedActivationMeter counting the step's saved tensors."""
        pad = getattr(getattr(self.train_data, "ids", None), "pad", None)
        num_tokens, self._real_tokens = self._global_count(count_tokens(mbs),
                                                           real_tokens(mbs, pad))
        if num_tokens == 0:
            raise ValueError(f"step {self.step}: the global batch has no label tokens")
        for c in self.chunks:
            c.train(not forward_only)
        if self.before_step is not None and not forward_only:
            self.before_step(mbs)
        return forward_backward(StepContext(
            self.schedule, self.chunks, mbs, num_tokens, self.comm, self.state,
            forward_only=forward_only,
            no_sync=None if forward_only else self.optimizer.no_sync,
            forward_step=self.forward_step, autocast=self.autocast,
            scale_loss=None if forward_only else self.optimizer.scale_loss, stats=stats,
            meter=meter))

    def forward_loss(self, mbs: list[dict]) -> float:
        """forward_backward's loss without gradients or dropout; the chunks are left in
        training mode."""
        loss = self.forward_backward(mbs, forward_only=True)
        for c in self.chunks:
            c.train()
        return loss

    def optimizer_step(self, lr: float):
        """One DistributedOptimizer step over the gradients forward_backward left:
        global-norm clipping, AdamW at `lr`, ZeRO all-gather. The step counter and data
        position do not move. -> engine.optim.StepResult (grad_norm, skipped)."""
        return self.optimizer.step(lr)

    def train_step(self, stats=None) -> StepStats:
        """stats: an engine.pipeline.stats.ScheduleStats to fill (the profiler's timeline)."""
        clock = Clock(self.device)
        t0 = clock.mark()
        lr = lr_at(self.step, self.cfg.train)
        mbs = self.microbatches(self.train_data, self.step)
        with step_guard(self.state, self.step + 1):   # names a dead peer on failure
            loss = self.forward_backward(mbs, stats=stats)
            scaler = self.optimizer.scaler
            can_back_off = scaler is not None and scaler.scale > scaler.min_scale
            result = self.optimizer_step(lr)
        self.step += 1
        return StepStats(self.step, loss, lr, result.grad_norm, self._real_tokens,
                         clock.seconds(t0, clock.mark()), result.skipped,
                         result.skipped and can_back_off)

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation of the whole job against its devices' matmul peak (the
        planner's profile on known GPUs; on CPU this process's measured matmul rate)."""
        return self.metrics.mfu(tokens_per_s)

    @torch.no_grad()
    def evaluate(self, data=None, batches: int | None = None) -> float:
        """Token-weighted mean loss over fixed dev batches (the same every call, split
        across data-parallel ranks)."""
        data = data or self.dev_data
        batches = batches or self.cfg.train.eval_batches
        per_rank = max(1, batches // self.dp)
        mbs = [data.get_batch(i * self.dp + self.dp_rank, self.cfg.train.micro_batch_size)
               for i in range(per_rank)]
        return self.forward_loss(mbs)

    # ---- checkpoints (engine/train/checkpointing.py) -----------------------------------
    def save(self, path: str | None = None) -> str:
        """Collective. Without `path` a managed step checkpoint in out_dir (see
        checkpointing.save); the state is probed and never written when diverged."""
        return checkpointing.save(self, path)

    def resume(self, path: str):
        """Continue from the checkpoint at `path` (written by any layout)."""
        checkpointing.resume(self, path)

    # ---- the loop --------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> list[StepStats]:
        tc = self.cfg.train
        history = []
        last = min(tc.steps, stop_at) if stop_at is not None else tc.steps
        self.metrics.start(self.step)
        stop = active_stop()   # SIGTERM / SIGINT: stop after a step (engine/train/stop.py)
        self.stopped_by = None
        profiler = StepProfiler.from_config(tc.profile_steps, tc.out_dir, self.state,
                                            self.device, self.log)
        while self.step < last:
            with profiler.step(self.step + 1) as stats:
                st = self.train_step(stats)
            history.append(st)
            self.guard.observe(st.step, st.loss, st.skipped, st.backoff)
            record = self.metrics.observe(st)   # engine/train/metrics.py: line and sinks
            if st.step % tc.log_every == 0 or st.step == last:
                terms = self.log_terms() if self.log_terms is not None else {}
                self.metrics.log_step(st, record, terms,
                                      self._skip_note(st) if st.skipped else "")
            if self.dev_data is not None and tc.eval_every and (
                    st.step % tc.eval_every == 0 or st.step == tc.steps):
                record["dev_loss"] = self.evaluate()
                self.metrics.log_dev(st.step, record["dev_loss"])
            self.metrics.write(record)
            if tc.save_every and st.step % tc.save_every == 0:
                if self.guard.in_streak:       # the weights may be garbage: keep the last
                    self.log(f"step {st.step:5d} | not saving: {self.guard.skipped_in_a_row}"
                             " step(s) in a row skipped for inf/nan gradients")
                else:
                    self.save()
            if stop is not None and st.step < last and stop.agreed(self.state):
                self.stopped_by = stop.stopped_by
                break
        profiler.close()   # a run that ends inside the profiled steps still writes them
        self.metrics.close()
        return history

    def _skip_note(self, st: StepStats) -> str:
        if st.backoff:
            return (f" | skipped (fp16 overflow: loss scale backs off to "
                    f"{self.optimizer.loss_scale:g})")
        return (f" | skipped (inf/nan grads, {self.guard.skipped_in_a_row} in a row of at "
                f"most {self.cfg.train.max_skipped_steps})")
