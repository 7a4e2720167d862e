"""The one training loop that pretrain, distill and finetune share.

Per optimizer step: this data-parallel rank's microbatches -> the pipeline schedule's
forward_backward (plain gradient accumulation when pp == 1) -> clip + optimizer step ->
log. Losses are token-weighted over the whole global batch: each microbatch's summed
token loss is divided by the global label count, so any layout reproduces the
single-process numbers (see engine/schedules.py).

Batches are a pure function of (seed, index) (engine/data/datasets.py), so the data
position is just the step count and `--resume` continues bitwise on CPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch

from engine import checkpoint as ckpt_lib
from engine.config import RunConfig
from engine.flops import train_flops_per_token
from model import GLM

BATCH_KEYS = ("input_ids", "position_ids", "block_position_ids", "prefix_lens")


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


def lm_loss(model: GLM, batch: dict, device) -> torch.Tensor:
    """The default objective: summed token cross-entropy of the batch (the caller divides
    by the global label count). Distillation and fine-tuning pass their own."""
    return model(**model_inputs(batch, device), labels=batch["labels"].to(device)).sum()


def accumulate(model: GLM, microbatches: list[dict], num_tokens: int, device,
               autocast, loss_fn=lm_loss) -> float:
    """No-pipeline schedule: gradient accumulation. Returns the step loss."""
    total = 0.0
    for mb in microbatches:
        with autocast():
            loss = loss_fn(model, mb, device) / num_tokens
        loss.backward()
        total += loss.item()
    return total


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float


class Trainer:
    def __init__(self, cfg: RunConfig, train_data, dev_data=None, *,
                 tokenizer_sha256: str | None = None, log=print, device=None,
                 model: GLM | None = None, extra_meta: dict | None = None,
                 loss_fn=lm_loss, aux_modules: dict | None = None):
        self.cfg = cfg
        self.loss_fn = loss_fn
        # trained alongside the model and saved next to it as "aux.<name>.<param>" (e.g. a
        # distillation projection); model loaders ask only for model names and skip them
        self.aux_modules = torch.nn.ModuleDict(aux_modules or {})
        self.train_data, self.dev_data = train_data, dev_data
        self.tokenizer_sha256 = tokenizer_sha256
        self.log = log
        self.extra_meta = extra_meta or {}
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model if model is not None else GLM.build(cfg.model, seed=tc.seed,
                                                               device=self.device)
        if tc.init_from:
            ckpt = ckpt_lib.Checkpoint(tc.init_from)
            ckpt.check_tokenizer(tokenizer_sha256)
            ckpt_lib.load_model_weights(self.model, ckpt)
        self.aux_modules.to(self.device)
        trained = [p for p in self.model.parameters() if p.requires_grad] + list(
            self.aux_modules.parameters())
        decay = [p for p in trained if p.ndim >= 2]
        no_decay = [p for p in trained if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, foreach=False)
        precision = tc.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.step = 0
        self.flops_per_token = train_flops_per_token(cfg.model, tc.seq_len)
        os.makedirs(tc.out_dir, exist_ok=True)
        self.metrics_path = os.path.join(tc.out_dir, "metrics.jsonl")

    # ---- pieces ----------------------------------------------------------------------
    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def microbatches(self, step: int) -> list[dict]:
        tc = self.cfg.train
        m = tc.num_microbatches
        return [self.train_data.get_batch(step * m + i, tc.micro_batch_size) for i in range(m)]

    def train_step(self) -> StepStats:
        tc = self.cfg.train
        t0 = time.perf_counter()
        lr = lr_at(self.step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mbs = self.microbatches(self.step)
        num_tokens = count_tokens(mbs)
        if num_tokens == 0:
            raise ValueError(f"step {self.step}: the batch has no label tokens")
        self.model.train()
        loss = accumulate(self.model, mbs, num_tokens, self.device, self.autocast,
                          self.loss_fn)
        params = [p for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, tc.grad_clip if tc.grad_clip > 0 else float("inf")).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(int(mb["input_ids"].numel()) for mb in mbs)
        return StepStats(self.step, loss, lr, grad_norm, tokens, time.perf_counter() - t0)

    @torch.no_grad()
    def evaluate(self, data=None, batches: int | None = None) -> float:
        """Token-weighted mean loss over fixed dev batches (the same every call)."""
        data = data or self.dev_data
        batches = batches or self.cfg.train.eval_batches
        self.model.eval()
        total, count = 0.0, 0
        for i in range(batches):
            b = data.get_batch(i, self.cfg.train.micro_batch_size)
            with self.autocast():
                losses = self.model(**model_inputs(b, self.device),
                                    labels=b["labels"].to(self.device))
            total += losses.sum().item()
            count += int((b["labels"] != -100).sum())
        self.model.train()
        return total / max(count, 1)

    def _write_metrics(self, record: dict):
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ---- checkpoints -----------------------------------------------------------------
    def named_trained_parameters(self):
        yield from self.model.named_parameters()
        for n, p in self.aux_modules.named_parameters():
            yield f"aux.{n}", p

    def save(self, path: str | None = None) -> str:
        path = path or os.path.join(self.cfg.train.out_dir, "checkpoint")
        optim = {}
        names = {id(p): n for n, p in self.named_trained_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = self.optimizer.state.get(p)
                if st:
                    for k in ("exp_avg", "exp_avg_sq"):
                        optim[f"{k}/{names[id(p)]}"] = st[k]
                    optim[f"step/{names[id(p)]}"] = torch.as_tensor(st["step"]).reshape(1)
        meta = {
            "config": self.cfg.to_dict(),
            "step": self.step,
            "data_position": {"step": self.step},
            "rng": ckpt_lib.rng_state(),
            "tokenizer_sha256": self.tokenizer_sha256,
            "layout": {"tp": 1, "pp": 1, "dp": 1, "vpp": 1, "zero_stage": 0},
            **self.extra_meta,
        }
        tensors = dict(self.model.state_dict())
        tensors.update({f"aux.{k}": v for k, v in self.aux_modules.state_dict().items()})
        ckpt_lib.save_checkpoint(path, tensors, optim, meta)
        return path

    def resume(self, path: str):
        ckpt = ckpt_lib.Checkpoint(path)
        ckpt.check_tokenizer(self.tokenizer_sha256)
        ckpt_lib.load_model_weights(self.model, ckpt)
        if len(self.aux_modules):
            aux = ckpt.load("model", [f"aux.{k}" for k in self.aux_modules.state_dict()])
            self.aux_modules.load_state_dict({k[4:]: v for k, v in aux.items()})
        optim = ckpt.load("optim") if ckpt.names("optim") else {}
        for n, p in self.named_trained_parameters():
            if f"exp_avg/{n}" in optim:
                self.optimizer.state[p] = {
                    "step": optim[f"step/{n}"].reshape(()).clone(),
                    "exp_avg": optim[f"exp_avg/{n}"].to(p.device).clone(),
                    "exp_avg_sq": optim[f"exp_avg_sq/{n}"].to(p.device).clone()}
        self.step = int(ckpt.meta["step"])
        ckpt_lib.set_rng_state(ckpt.meta["rng"])

    # ---- the loop --------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> list[StepStats]:
        tc = self.cfg.train
        history = []
        last = min(tc.steps, stop_at) if stop_at is not None else tc.steps
        window_tokens, window_time = 0, 0.0
        while self.step < last:
            st = self.train_step()
            history.append(st)
            window_tokens += st.tokens
            window_time += st.seconds
            if not math.isfinite(st.loss):
                raise FloatingPointError(f"loss became {st.loss} at step {st.step}")
            record = {"step": st.step, "loss": st.loss, "lr": st.lr, "grad_norm": st.grad_norm,
                      "tokens": st.tokens, "seconds": st.seconds}
            if st.step % tc.log_every == 0 or st.step == last:
                tps = window_tokens / max(window_time, 1e-9)
                record["tokens_per_s"] = tps
                record["flops_per_s"] = tps * self.flops_per_token
                self.log(f"step {st.step:5d}/{tc.steps} | loss {st.loss:.4f} | lr {st.lr:.2e}"
                         f" | gnorm {st.grad_norm:.3f} | {tps:,.0f} tok/s"
                         f" | {tps * self.flops_per_token / 1e9:.2f} GFLOP/s")
                window_tokens, window_time = 0, 0.0
            if self.dev_data is not None and tc.eval_every and (
                    st.step % tc.eval_every == 0 or st.step == tc.steps):
                record["dev_loss"] = self.evaluate()
                self.log(f"step {st.step:5d} | dev loss {record['dev_loss']:.4f} | "
                         f"ppl {math.exp(min(record['dev_loss'], 50)):.1f}")
            self._write_metrics(record)
            if tc.save_every and st.step % tc.save_every == 0:
                self.save()
        return history
