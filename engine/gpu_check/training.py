"""GPU check (3): single-GPU bf16 training (autocast) of a preset with kernels="triton"
and kernels="torch": tokens/s, MFU, loss falling, peak memory."""
from __future__ import annotations

import json
import os
import traceback

import torch

from engine.gpu_check.common import peak_gib, reset_peak

class Patterns:
    """Learnable synthetic data: each row counts up by a fixed stride from a random start
    (mod 1000), so the loss falls quickly when the model learns the stride."""

    def __init__(self, seq_len: int, seed: int = 0):
        self.seq_len, self.seed = seq_len, seed

    def get_batch(self, index: int, batch_size: int) -> dict:
        from model.masks import causal_example, collate
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start = torch.randint(0, 1000, (batch_size, 1), generator=g)
        stride = torch.randint(1, 8, (batch_size, 1), generator=g)
        rows = (start + stride * torch.arange(self.seq_len + 1)) % 1000 + 10
        return collate([causal_example(r.tolist()) for r in rows], self.seq_len, pad_id=0)


def _train(plan, device, kernels: str, out_dir: str, log) -> dict:
    from engine.config import build_run_config
    from engine.train.trainer import Trainer
    cfg = build_run_config({
        "model": {"preset": plan.train_preset, "kernels": kernels},
        "train": {"steps": plan.train_steps, "micro_batch_size": plan.train_micro_batch_size,
                  "num_microbatches": 1, "seq_len": plan.train_seq_len, "lr": 1e-3,
                  "min_lr": 1e-4, "warmup_steps": 10, "log_every": 10, "eval_every": 0,
                  "precision": "auto", "out_dir": out_dir}})
    reset_peak(device)
    tr = Trainer.from_config(cfg, Patterns(plan.train_seq_len), device=device, log=log)
    hist = tr.fit()
    timed = hist[1:]   # step 1 includes the Triton JIT compiles
    tokens = sum(h.tokens for h in timed)
    seconds = sum(h.seconds for h in timed)
    tps = tokens / seconds
    losses = [h.loss for h in hist]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {"kernels": kernels, "steps": len(hist), "tokens_per_s": round(tps),
            "mfu": round(tr.mfu(tps) or 0.0, 4), "first_step_s": round(hist[0].seconds, 2),
            "median_step_ms": round(1e3 * sorted(h.seconds for h in timed)[len(timed) // 2], 2),
            "loss_first": round(first, 4), "loss_last": round(last, 4),
            "loss_falls": last < first - 0.5,
            "peak_memory_gib": peak_gib(device)}


def section_training(plan, device, peaks, log) -> dict:
    runs = {}
    for kernels in ("triton", "torch"):
        try:
            runs[kernels] = _train(plan, device, kernels,
                                   os.path.join(plan.out_dir, f"train_{kernels}"), log)
        except Exception as err:  # noqa: BLE001 - the other variant still runs
            runs[kernels] = {"kernels": kernels, "error": f"{type(err).__name__}: {err}"[:800],
                             "traceback": traceback.format_exc()[-3000:]}
        log(json.dumps(runs[kernels]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    t, e = runs["triton"].get("tokens_per_s"), runs["torch"].get("tokens_per_s")
    return {"runs": runs, "triton_over_torch": round(t / e, 3) if t and e else None}
