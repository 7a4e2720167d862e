"""What a training run reports: the step log line, metrics.jsonl, TensorBoard.

One line every `train.log_every` steps (rank 0), in the spirit of torchtitan's:

    00:41:07 step    50/500 | loss 5.8123 | lr 9.80e-04 | gnorm 0.912 | 3,210 tok/s |
      tokens 409,600 | mem 0.61 GiB rss | MFU 3.1% | elapsed 2m07s | ETA 19m03s

loss: the mean over the steps since the last line (skipped steps left out), not one
step's noisy value; tok/s: real (non-padding) tokens of the whole job per second of
device time in the window; tokens: real tokens seen so far (carried over a resume in
meta.json); mem: this rank's peak allocated memory on CUDA, peak resident set size on
CPU; MFU: model FLOPs (engine/train/flops.py) against the devices' matmul peak
(engine/train/timing.peak_flops: the planner's profile of a known GPU, the measured fp32
matmul rate on CPU); elapsed: wall time since this process's loop started; ETA: the
steps left at this process's mean wall time per step (evaluation and saves included).

metrics.jsonl gets one record per step: step, loss, lr, grad_norm, tokens, seconds and,
on log steps, tokens_per_s, flops_per_s, mfu, loss_avg, tokens_seen, memory_gib,
elapsed_s, eta_s, time (unix seconds), plus dev_loss on evaluation steps and a hook's
terms. With `train.tensorboard` the same numbers go to out_dir/tensorboard as scalars
(needs the optional `tensorboard` package: pip install -e ".[tensorboard]").
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time

import torch

from engine.progress import eta_seconds, format_duration
from engine.timing import peak_flops

TENSORBOARD_DIR = "tensorboard"


def check_tensorboard():
    """The one-line error for `train.tensorboard` without the package (every rank checks,
    so no rank starts training while another stops)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError("train.tensorboard=true needs the optional tensorboard package: "
                         "pip install -e \".[tensorboard]\" (or pip install tensorboard), "
                         "or leave train.tensorboard off")


def peak_memory(device) -> tuple[float, str]:
    """(GiB, what it is): this process's peak allocated CUDA memory, else its peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, "peak"
    try:
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes
        return (kib / 2 ** 20 if sys.platform != "darwin" else kib / 2 ** 30), "rss"
    except (ImportError, OSError):
        return float("nan"), "rss"


def param_counts(model_config, trained_parameters) -> tuple[int, int]:
    """(parameters of the whole model, parameters trained on this rank): under tp / pp a
    rank holds a slice, and a header that counts one rank's share reads as the model's."""
    from model import GLM
    with torch.device("meta"):
        whole = GLM(model_config).num_params()
    return whole, sum(p.numel() for _, p in trained_parameters)


def params_line(model_config, trained_parameters, state) -> str:
    whole, here = param_counts(model_config, trained_parameters)
    if not state.distributed:
        return f"{whole:,} parameters (whole model)" + (
            f", {here:,} trained" if here != whole else "")
    return (f"{whole:,} parameters (whole model), {here:,} on this rank "
            f"(rank {state.rank} of {state.dims.world_size})")


class TrainMetrics:
    """The logging window and the sinks. Everything runs on every rank (the MFU peak is
    measured on rank 0 only); only rank 0 prints and writes."""

    def __init__(self, cfg, *, rank: int, log, device, devices: int, flops_per_token: float):
        tc = cfg.train
        self.rank, self.log, self.device = rank, log, torch.device(device)
        self.devices, self.flops_per_token = devices, flops_per_token
        self.total_steps = tc.steps
        self.path = os.path.join(tc.out_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(tc.out_dir, TENSORBOARD_DIR) if tc.tensorboard else None
        if self.tb_dir is not None:
            check_tensorboard()
        self._writer = None
        self._peak: float | None = None
        self.tokens_seen = 0
        self._reset_window()
        self._start = self._start_step = None

    def _reset_window(self):
        self._losses, self._tokens, self._seconds = [], 0, 0.0

    # ---- the loop's calls -------------------------------------------------------------
    def start(self, step: int):
        """The loop (re)starts at `step`: elapsed and ETA count from here."""
        self._start, self._start_step = time.monotonic(), step
        self._reset_window()

    def observe(self, st) -> dict:
        """A finished step (trainer.StepStats) -> its metrics record."""
        self.tokens_seen += st.tokens
        self._tokens += st.tokens
        self._seconds += st.seconds
        if not st.skipped and math.isfinite(st.loss):
            self._losses.append(st.loss)
        return {"step": st.step, "loss": st.loss, "lr": st.lr, "grad_norm": st.grad_norm,
                "tokens": st.tokens, "seconds": st.seconds}

    def mfu(self, tokens_per_s: float) -> float | None:
        if self._peak is None:
            self._peak = peak_flops(self.device)[0] or 0.0
        return (tokens_per_s * self.flops_per_token / (self._peak * self.devices)
                if self._peak else None)

    def log_step(self, st, record: dict, terms: dict, note: str = ""):
        """The log line; fills `record` with the window's numbers."""
        tps = self._tokens / max(self._seconds, 1e-9)
        loss = sum(self._losses) / len(self._losses) if self._losses else st.loss
        record["tokens_per_s"] = tps
        record["flops_per_s"] = tps * self.flops_per_token
        mfu = self.mfu(tps) if self.rank == 0 else None
        if mfu is not None:
            record["mfu"] = mfu
        mem, kind = peak_memory(self.device)
        now = time.monotonic()
        start = self._start if self._start is not None else now
        done = st.step - (self._start_step or 0)
        elapsed = now - start
        eta = eta_seconds(elapsed, done, done + self.total_steps - st.step)
        record.update(loss_avg=loss, tokens_seen=self.tokens_seen, memory_gib=mem,
                      elapsed_s=elapsed, time=time.time())
        if eta is not None:
            record["eta_s"] = eta
        record.update(terms)
        self.log(f"{time.strftime('%H:%M:%S')} step {st.step:5d}/{self.total_steps} | "
                 f"loss {loss:.4f} | lr {st.lr:.2e} | gnorm {st.grad_norm:.3f} | "
                 f"{tps:,.0f} tok/s | tokens {self.tokens_seen:,} | mem {mem:.2f} GiB {kind}"
                 + (f" | MFU {mfu:.1%}" if mfu is not None else "")
                 + "".join(f" | {k} {v:.4f}" for k, v in terms.items())
                 + f" | elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}"
                 + note)
        self._reset_window()

    def log_dev(self, step: int, loss: float):
        self.log(f"{time.strftime('%H:%M:%S')} step {step:5d} | dev loss {loss:.4f} | "
                 f"ppl {math.exp(min(loss, 50)):.1f}")

    def write(self, record: dict):
        if self.rank != 0:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb_dir is not None:
            self._tensorboard(record)

    def _tensorboard(self, record: dict):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(self.tb_dir)
        step = record["step"]
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(
                    v, bool):
                self._writer.add_scalar(k, v, step)
        if "tokens_per_s" in record or "dev_loss" in record:   # a log step: make it visible
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ---- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict):
        self.tokens_seen = int(state.get("tokens_seen", 0))
