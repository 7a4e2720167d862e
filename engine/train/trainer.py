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

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from engine.train import checkpoint as ckpt_lib
from engine.config import RunConfig
from engine.train.divergence import DivergenceError, DivergenceGuard
from engine.train.flops import train_flops_per_token
from engine.parallel.monitor import step_guard
from engine.optim import DistributedOptimizer, OptimConfig
from engine.train.run_dir import CheckpointStore
from engine.train.profiling import StepProfiler
from engine.pipeline.schedules import build_stage, forward_backward, glm_forward_step
from engine.train.stop import active as active_stop
from engine.train.timing import Clock, peak_flops
from model.config import layout_mismatch

BATCH_KEYS = ("input_ids", "position_ids", "block_position_ids", "prefix_lens",
              "doc_starts")


def lr_at(step: int, cfg) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def model_inputs(batch: dict, device) -> dict:
    return {k: batch[k].to(device) for k in BATCH_KEYS if k in batch}


def count_tokens(microbatches: list[dict]) -> int:
    return int(sum((mb["labels"] != -100).sum().item() for mb in microbatches))


def real_tokens(microbatches: list[dict], pad_id: int | None) -> int:
    """Input tokens that are not padding (all of them when the pad id is unknown)."""
    if pad_id is None:
        return sum(int(mb["input_ids"].numel()) for mb in microbatches)
    return int(sum((mb["input_ids"] != pad_id).sum().item() for mb in microbatches))


def lm_loss(model, batch: dict, device) -> torch.Tensor:
    """The default objective: summed token cross-entropy of the batch (the caller divides
    by the global label count). Distillation and fine-tuning pass their own."""
    return model(**model_inputs(batch, device), labels=batch["labels"].to(device)).sum()


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int       # real (non-padding) input tokens of the whole job this step
    seconds: float    # device time (engine.train.timing.Clock)
    skipped: bool = False
    backoff: bool = False   # skipped as an fp16 loss-scale back-off (not divergence)


class Trainer:
    """state: engine.parallel.state.ParallelState for a distributed run, None for one process.
    model: a ready GLM to train instead of building one (single stage only).
    loss_fn(model, batch, device) -> summed token loss (single stage), or forward_step
    (chunk, batch, hidden, side) -> per-token loss on the last stage (any layout).
    aux_modules: trained beside the model, saved as "aux.<name>.*" (e.g. a projection).
    Two hooks, each called on every rank at the same point, so they may hold collectives:
    before_step(microbatches) runs before each training forward/backward (distillation
    runs a pipelined teacher over the same microbatches there); log_terms() -> {name:
    float} adds values to each log line and metrics record (distillation's per-term
    means, reduced over the job).
    extra_files: {name in the checkpoint: source path} written inside every checkpoint's
    atomic save and hashed with it (the runners pass the tokenizer)."""

    def __init__(self, cfg: RunConfig, train_data, dev_data=None, *, state=None,
                 tokenizer_sha256: str | None = None, log=print, device=None, model=None,
                 extra_meta: dict | None = None, loss_fn=None, forward_step=None,
                 aux_modules: dict | None = None, mp_group=None, before_step=None,
                 log_terms=None, extra_files: dict | None = None):
        self.cfg, self.state = cfg, state
        self.extra_files = dict(extra_files or {})
        self.train_data, self.dev_data = train_data, dev_data
        self.tokenizer_sha256 = tokenizer_sha256
        self.extra_meta = extra_meta or {}
        tc, pc = cfg.train, cfg.parallel
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.rank = state.rank if state else 0
        self.log = log if self.rank == 0 else (lambda *a, **k: None)
        self.pp = state.dims.pp if state else 1
        self.dp = state.dims.dp if state else 1
        self.dp_rank = state.coords.dp if state else 0
        self.stage = state.coords.pp if state else 0
        if state is not None:
            self.device = state.device
        else:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available()
                                                  else "cpu"))
        # ---- the model: this rank's chunks, initialised like the single-process model
        if model is not None:
            if self.pp > 1:
                raise ValueError("Trainer(model=...) takes a whole model; with pp > 1 the "
                                 "trainer builds the stages itself")
            self.chunks = [model.to(self.device)]
        else:
            vpp = state.dims.vpp if state else 1
            self.chunks = build_stage(cfg.model, self.pp, vpp, self.stage, seed=tc.seed,
                                      device=self.device)
        if tc.init_from:
            ckpt = ckpt_lib.Checkpoint(tc.init_from)
            ckpt.check_tokenizer(tokenizer_sha256)
            # same shapes are not enough: an imported ChatGLM is causal 1D (model/config.py)
            wrong = layout_mismatch(cfg.model, ckpt.meta.get("config", {}).get("model", {}))
            if wrong:
                raise ValueError(f"train.init_from {tc.init_from}: {wrong}")
            for chunk in self.chunks:
                ckpt_lib.load_model_weights(chunk, ckpt)
        # same default generator on every rank (replicated dropout); tensor parallelism
        # keeps its own per-rank stream for sharded tensors
        torch.manual_seed(tc.seed)
        self.tp = state.dims.tp if state else 1
        self.tp_rank = state.coords.tp if state else 0
        if self.tp > 1:
            # TP weights are slices of the full stage just built (and loaded)
            from engine.tensor_parallel import parallelize
            for chunk in self.chunks:
                parallelize(chunk, state.tp_group, sequence_parallel=pc.sequence_parallel)
        if tc.recompute:
            # after parallelize: the checkpointed blocks are the TP ones, and their replay
            # restores the chunk's TP dropout stream (chunk.tp_rng) as well as the default
            from engine.train.recompute import recompute_layers
            for chunk in self.chunks:
                recompute_layers(chunk)
        self.aux_modules = torch.nn.ModuleDict(aux_modules or {}).to(self.device)
        # ---- the objective
        if forward_step is None and loss_fn is not None:
            if self.pp > 1:
                raise ValueError("loss_fn(model, batch, device) needs a single stage; pass "
                                 "forward_step(chunk, batch, hidden, side) for pp > 1")
            forward_step = (lambda chunk, batch, hidden, side:  # noqa: E731
                            loss_fn(chunk, batch, self.device))
        self.forward_step = forward_step or glm_forward_step
        self.before_step, self.log_terms = before_step, log_terms
        self.schedule = pc.schedule if self.pp > 1 else "none"
        # ---- precision. "auto": fp32 on CPU; on CUDA bf16 autocast over fp32 parameters.
        # "bf16" / "fp16": parameters and gradients in that dtype, fp32 master weights in
        # the optimizer (fp16 with dynamic loss scaling)
        self.autocast_dtype = None
        param_precision = "fp32"
        if tc.precision == "auto" and self.device.type == "cuda":
            self.autocast_dtype = torch.bfloat16
        elif tc.precision in ("bf16", "fp16"):
            param_precision = tc.precision
        self.precision = tc.precision
        self.comm = None
        if self.pp > 1:
            from engine.pipeline.p2p import P2P
            from engine.optim.config import PRECISIONS
            # under autocast, stages exchange in the compute dtype (half of fp32's bytes)
            self.comm = P2P(state, cfg.model.hidden_size, dtype=PRECISIONS[param_precision],
                            seq_shards=self.tp if pc.sequence_parallel else 1,
                            wire_dtype=self.autocast_dtype)
        # ---- the optimizer takes over the parameters' storage: build it last
        self.optimizer = DistributedOptimizer(
            list(self.named_trained_parameters()),
            OptimConfig(lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                        weight_decay=tc.weight_decay, max_grad_norm=tc.grad_clip,
                        zero_stage=pc.zero_stage, precision=param_precision),
            dp_group=state.dp_group if state and self.dp > 1 else None,
            model_parallel_group=mp_group, tp_rank=self.tp_rank)
        self.step = 0
        self.flops_per_token = train_flops_per_token(cfg.model, tc.seq_len)
        self._peak: float | None = None     # measured / looked up at the first log line
        self._real_tokens = 0
        if self.rank == 0:
            os.makedirs(tc.out_dir, exist_ok=True)
        self.metrics_path = os.path.join(tc.out_dir, "metrics.jsonl")
        self.guard = DivergenceGuard(tc.max_skipped_steps, tc.loss_spike_factor)
        self.store = CheckpointStore(tc.out_dir, tc.keep_checkpoints, log=self.log)
        self._saved_step: int | None = None    # the step of the last managed save

    # ---- pieces ----------------------------------------------------------------------
    @property
    def model(self):
        """The whole model (single-stage runs); stage 0's first chunk otherwise."""
        return self.chunks[0]

    def named_trained_parameters(self):
        for chunk in self.chunks:
            yield from ((n, p) for n, p in chunk.named_parameters() if p.requires_grad)
        for n, p in self.aux_modules.named_parameters():
            yield f"aux.{n}", p

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

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

    def _run(self, mbs, forward_only=False, stats=None) -> float:
        pad = getattr(getattr(self.train_data, "ids", None), "pad", None)
        num_tokens, self._real_tokens = self._global_count(count_tokens(mbs),
                                                           real_tokens(mbs, pad))
        if num_tokens == 0:
            raise ValueError(f"step {self.step}: the global batch has no label tokens")
        for c in self.chunks:
            c.train(not forward_only)
        if self.before_step is not None and not forward_only:
            self.before_step(mbs)
        return forward_backward(self.schedule, self.chunks, mbs, num_tokens, self.comm,
                                self.state, forward_only=forward_only,
                                no_sync=None if forward_only else self.optimizer.no_sync,
                                forward_step=self.forward_step, autocast=self.autocast,
                                scale_loss=None if forward_only else self.optimizer.scale_loss,
                                stats=stats)

    def train_step(self, stats=None) -> StepStats:
        """stats: an engine.pipeline.schedules.ScheduleStats to fill (the profiler's timeline)."""
        clock = Clock(self.device)
        t0 = clock.mark()
        lr = lr_at(self.step, self.cfg.train)
        mbs = self.microbatches(self.train_data, self.step)
        with step_guard(self.state, self.step + 1):   # names a dead peer on failure
            loss = self._run(mbs, stats=stats)
            scaler = self.optimizer.scaler
            can_back_off = scaler is not None and scaler.scale > scaler.min_scale
            result = self.optimizer.step(lr)
        self.step += 1
        return StepStats(self.step, loss, lr, result.grad_norm, self._real_tokens,
                         clock.seconds(t0, clock.mark()), result.skipped,
                         result.skipped and can_back_off)

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation of the whole job against its devices' matmul peak (the
        planner's profile on known GPUs; on CPU this process's measured matmul rate)."""
        if self._peak is None:
            self._peak = peak_flops(self.device)[0] or 0.0
        devices = self.dp * self.tp * self.pp
        return tokens_per_s * self.flops_per_token / (self._peak * devices) \
            if self._peak else None

    @torch.no_grad()
    def evaluate(self, data=None, batches: int | None = None) -> float:
        """Token-weighted mean loss over fixed dev batches (the same every call, split
        across data-parallel ranks)."""
        data = data or self.dev_data
        batches = batches or self.cfg.train.eval_batches
        per_rank = max(1, batches // self.dp)
        mbs = [data.get_batch(i * self.dp + self.dp_rank, self.cfg.train.micro_batch_size)
               for i in range(per_rank)]
        loss = self._run(mbs, forward_only=True)
        for c in self.chunks:
            c.train()
        return loss

    def _write_metrics(self, record: dict):
        if self.rank == 0:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # ---- checkpoints -----------------------------------------------------------------
    def _barrier(self):
        if self.state is not None:
            dist.barrier()

    def _agree(self, error: tuple | None, payload=None) -> list:
        """Every rank's (error, payload) on every rank (a collective in place of a
        barrier); the first error is raised everywhere, so one rank's failed write stops
        all of them at the same point instead of leaving the others in the next barrier."""
        items = [(error, payload)]
        if self.state is not None:
            items = [None] * self.state.dims.world_size
            dist.all_gather_object(items, (error, payload))
        for rank, (err, _) in enumerate(items):
            if err is not None:
                kind, msg = err
                cls = DivergenceError if kind == "diverged" else ckpt_lib.CheckpointError
                where = f"rank {rank}: " if self.state is not None else ""
                raise cls(f"checkpoint at step {self.step} not saved: {where}{msg}")
        return [p for _, p in items]

    def save(self, path: str | None = None) -> str:
        """Every rank takes part; the first dp rank of each stage writes that stage's
        model and optimizer tensors under their global names (layout-free). Without
        `path` the checkpoint is out_dir/checkpoints/step_N (the last K kept,
        out_dir/checkpoint pointing at the newest: engine/train/run_dir.py). A state that
        diverged (in a run of skipped steps, or with inf/nan weights) is never written;
        free space is checked first; a failed save removes its partial files."""
        if path is None and self._saved_step == self.step:
            return self.store.path(self.step)   # this state is on disk already
        if path is None and self.guard.in_streak:
            raise DivergenceError(f"checkpoint at step {self.step} not saved: the last "
                                  f"{self.guard.skipped_in_a_row} step(s) were skipped for "
                                  "inf/nan gradients")
        if path is None:
            self._probe()
        full = self.optimizer.full_state()   # collective over dp
        tensors = self._full_tensors(list(self.named_trained_parameters()))  # over tp
        optim = {}
        for key in ("master", "exp_avg", "exp_avg_sq"):
            gathered = self._full_tensors([(n, st[key]) for n, st in full["params"].items()])
            optim.update({f"{key}/{n}": t for n, t in gathered.items()})
        writer = self.dp_rank == 0 and self.tp_rank == 0
        error, nbytes = None, 0
        if writer:
            nbytes = ckpt_lib.tensor_bytes(tensors) + ckpt_lib.tensor_bytes(optim)
            if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
                error = ("diverged", "the weights hold inf/nan")
        sizes = self._agree(error, nbytes)
        managed = path is None
        tmp = self.store.tmp_for(self.step) if managed else ckpt_lib.temp_dir_for(path)
        error = None
        if self.rank == 0:
            try:
                need = sum(sizes) + sum(os.path.getsize(p) for p in self.extra_files.values())
                tmp = self.store.begin(self.step) if managed else ckpt_lib.begin_save(path)
                ckpt_lib.check_free_space(tmp, need + (1 << 20), f"checkpoint step {self.step}")
            except (OSError, ValueError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                error = ("failed", str(e))
        self._agree(error)
        error = None
        if writer:
            try:
                ckpt_lib.write_tensors(tmp, f"model/stage{self.stage}.safetensors", tensors)
                ckpt_lib.write_tensors(tmp, f"optim/stage{self.stage}.safetensors", optim)
            except (OSError, SafetensorError, ValueError) as e:
                error = ("failed", f"writing {tmp}: {e}")
        try:
            self._agree(error)
        except ckpt_lib.CheckpointError:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        error = None
        final = self.store.path(self.step) if managed else os.path.abspath(path)
        if self.rank == 0:
            dims = self.state.dims if self.state else None
            meta = {
                "config": self.cfg.to_dict(),
                "step": self.step,
                "data_position": {"step": self.step},
                "rng": ckpt_lib.rng_state(),
                "tokenizer_sha256": self.tokenizer_sha256,
                "layout": {"tp": self.tp, "pp": self.pp, "dp": self.dp,
                           "vpp": dims.vpp if dims else 1,
                           "sequence_parallel": self.cfg.parallel.sequence_parallel,
                           "zero_stage": self.cfg.parallel.zero_stage},
                "optimizer": {k: v for k, v in full.items() if k != "params"},
                "divergence": self.guard.state_dict(),
                **self.extra_meta,
            }
            try:
                if managed:
                    if self.step >= self.cfg.train.steps:
                        self.store.pinned = None       # the run is complete
                    self.store.commit(self.step, meta, self.extra_files)
                else:
                    ckpt_lib.finish_save(path, meta, self.extra_files)
            except (OSError, ValueError) as e:
                if os.path.isdir(tmp):          # not yet renamed into place: partial
                    shutil.rmtree(tmp, ignore_errors=True)
                error = ("failed", str(e))
        self._agree(error)
        if managed:
            self._saved_step = self.step
        return final

    def _probe(self):
        """One forward (no dropout, no gradients, no RNG drawn) of the next training batch
        on the state about to be saved; the same value on every rank."""
        loss = self._run(self.microbatches(self.train_data, self.step), forward_only=True)
        for c in self.chunks:
            c.train()
        self.guard.check_state(self.step, loss)

    def _full_tensors(self, named: list) -> dict:
        """This rank's (name, tensor) pairs -> full-shape tensors (collective over tp)."""
        if self.tp == 1:
            return {n: t.detach() for n, t in named}
        from engine.tensor_parallel import gather_full_tensors
        model = [(n, t) for n, t in named if not n.startswith("aux.")]
        out = gather_full_tensors(model, self.cfg.model, self.state.tp_group)
        out.update({n: t.detach() for n, t in named if n.startswith("aux.")})
        return out

    def _local_tensors(self, full: dict, prefix: str = "") -> dict:
        """Full-shape tensors (keys optionally prefixed) -> this TP rank's slices, keyed
        by parameter name."""
        full = {n[len(prefix):]: t for n, t in full.items()}
        if self.tp == 1:
            return full
        from engine.tensor_parallel import shard_state_dict
        model = {n: t for n, t in full.items() if not n.startswith("aux.")}
        out = shard_state_dict(model, self.tp_rank, self.tp, self.cfg.model)
        out.update({n: t for n, t in full.items() if n.startswith("aux.")})
        return out

    def resume(self, path: str):
        ckpt = ckpt_lib.Checkpoint(path)
        ckpt.check_tokenizer(self.tokenizer_sha256)
        names = [n for n, _ in self.named_trained_parameters()]
        weights = self._local_tensors(ckpt.load("model", names))
        with torch.no_grad():
            for n, p in self.named_trained_parameters():
                if weights[n].shape != p.shape:
                    raise ckpt_lib.CheckpointError(
                        f"checkpoint tensor {n} has shape {tuple(weights[n].shape)}, this "
                        f"layout expects {tuple(p.shape)} (a different model config?)")
                p.copy_(weights[n])
        keys = ("master", "exp_avg", "exp_avg_sq")
        per_key = {k: self._local_tensors(
            {n: t for n, t in ckpt.load("optim", [f"{k}/{n}" for n in names]).items()},
            prefix=f"{k}/") for k in keys}
        state = {"params": {n: {k: per_key[k][n] for k in keys} for n in names},
                 **ckpt.meta["optimizer"]}
        self.optimizer.load_state_dict(state)
        self.step = int(ckpt.meta["step"])
        ckpt_lib.set_rng_state(ckpt.meta["rng"])
        self.guard.load_state_dict(ckpt.meta.get("divergence") or {})
        if os.path.realpath(os.path.dirname(path)) == os.path.realpath(self.store.root):
            self._saved_step = self.step      # resuming in place: that step is saved
            self.store.pinned = os.path.join(self.store.root, os.path.basename(path))
        self._warn_schedule_change(ckpt.meta)

    def _warn_schedule_change(self, meta: dict):
        """lr_at depends on these: another value moves the LR curve under a resumed run."""
        old = (meta.get("config") or {}).get("train") or {}
        tc = self.cfg.train
        changed = [f"{k} {old[k]} -> {getattr(tc, k)}"
                   for k in ("steps", "lr", "min_lr", "warmup_steps")
                   if k in old and old[k] != getattr(tc, k)]
        if changed:
            self.log(f"warning: resuming with another LR schedule than the checkpoint's "
                     f"({', '.join(changed)}): the learning rate changes from step "
                     f"{self.step} on")

    # ---- the loop --------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> list[StepStats]:
        tc = self.cfg.train
        history = []
        last = min(tc.steps, stop_at) if stop_at is not None else tc.steps
        window_tokens, window_time = 0, 0.0
        stop = active_stop()   # SIGTERM / SIGINT: stop after a step (engine/train/stop.py)
        self.stopped_by = None
        profiler = StepProfiler.from_config(tc.profile_steps, tc.out_dir, self.state,
                                            self.device, self.log)
        while self.step < last:
            with profiler.step(self.step + 1) as stats:
                st = self.train_step(stats)
            history.append(st)
            window_tokens += st.tokens
            window_time += st.seconds
            self.guard.observe(st.step, st.loss, st.skipped, st.backoff)
            record = {"step": st.step, "loss": st.loss, "lr": st.lr, "grad_norm": st.grad_norm,
                      "tokens": st.tokens, "seconds": st.seconds}
            if st.step % tc.log_every == 0 or st.step == last:
                tps = window_tokens / max(window_time, 1e-9)
                record["tokens_per_s"] = tps
                record["flops_per_s"] = tps * self.flops_per_token
                mfu = self.mfu(tps) if self.rank == 0 else None
                if mfu is not None:
                    record["mfu"] = mfu
                terms = self.log_terms() if self.log_terms is not None else {}
                record.update(terms)
                self.log(f"step {st.step:5d}/{tc.steps} | loss {st.loss:.4f} | lr {st.lr:.2e}"
                         f" | gnorm {st.grad_norm:.3f} | {tps:,.0f} tok/s"
                         f" | {tps * self.flops_per_token / 1e9:.2f} GFLOP/s"
                         + (f" | MFU {mfu:.1%}" if mfu is not None else "")
                         + "".join(f" | {k} {v:.4f}" for k, v in terms.items())
                         + (self._skip_note(st) if st.skipped else ""))
                window_tokens, window_time = 0, 0.0
            if self.dev_data is not None and tc.eval_every and (
                    st.step % tc.eval_every == 0 or st.step == tc.steps):
                record["dev_loss"] = self.evaluate()
                self.log(f"step {st.step:5d} | dev loss {record['dev_loss']:.4f} | "
                         f"ppl {math.exp(min(record['dev_loss'], 50)):.1f}")
            self._write_metrics(record)
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
        return history

    def _skip_note(self, st: StepStats) -> str:
        if st.backoff:
            return (f" | skipped (fp16 overflow: loss scale backs off to "
                    f"{self.optimizer.loss_scale:g})")
        return (f" | skipped (inf/nan grads, {self.guard.skipped_in_a_row} in a row of at "
                f"most {self.cfg.train.max_skipped_steps})")
