"""Measure this machine's fp32 matmul FLOP/s and a training step's achieved FLOP/s, side
by side in one run, and print their ratio (model FLOPs utilisation against the measured
matmul peak rather than a datasheet number).

    python runners/bench_train.py --model.preset small --bench.seq_len 128 \
        --bench.micro_batch_size 16 --bench.steps 5
    python runners/bench_train.py --bench.device cuda --bench.dtype bf16 --model.preset base

Times are device-true (engine.timing: CUDA events on CUDA).
"""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass

import torch

from engine.train.flops import train_flops_per_token
from engine.timing import Clock, peak_flops, time_fn
from model import GLM, GLMConfig
from engine.config_cli import Alias, command
from engine.errors import run_main


def matmul_flops(n: int, reps: int, device, dtype=torch.float32) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n ** 3 / time_fn(lambda: a @ b, device, warmup=2, reps=reps, stat="median")


def train_step_flops(cfg: GLMConfig, seq_len: int, batch: int, steps: int, device,
                     autocast_dtype=None):
    model = GLM.build(cfg, seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.padded_vocab_size, (batch, seq_len + 1), generator=g).to(device)
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    clock = Clock(device)
    times = []
    for i in range(steps + 1):
        with clock.span() as span:
            with amp:
                loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and kernels
            times.append(span.seconds)
    step = statistics.median(times)
    tokens = batch * seq_len   # random ids, no padding: every token is real
    return tokens / step, tokens / step * train_flops_per_token(cfg, seq_len), step


@dataclass
class BenchModel:
    preset: str = "small"          # GLMConfig preset


@dataclass
class BenchTrain:
    seq_len: int = 128             # tokens per sequence
    micro_batch_size: int = 16     # sequences per step
    steps: int = 5                 # timed steps (after one warmup step; median)
    matmul_n: int = 1024           # n of the n x n x n matmul that measures the peak
    threads: int = 0               # torch intra-op threads; 0 leaves torch's default
    device: str = ""               # cpu | cuda ("": cuda when available)
    # fp32 | bf16 (autocast over fp32 parameters, the trainer's CUDA default); the matmul
    # peak is measured in the same dtype
    dtype: str = "fp32"

    def __post_init__(self):
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"bench.dtype={self.dtype!r} must be fp32 or bf16")
        for k in ("seq_len", "micro_batch_size", "steps", "matmul_n"):
            if getattr(self, k) <= 0:
                raise ValueError(f"bench.{k}={getattr(self, k)} must be positive")


COMMAND = command(__doc__, {"model": BenchModel, "bench": BenchTrain}, aliases={
    "--preset": Alias("model.preset"), "--seq-len": Alias("bench.seq_len"),
    "--batch": Alias("bench.micro_batch_size"), "--steps": Alias("bench.steps"),
    "--matmul-n": Alias("bench.matmul_n"), "--threads": Alias("bench.threads"),
    "--device": Alias("bench.device"), "--dtype": Alias("bench.dtype")})


def run(config):
    args = config.bench
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"bench.device={args.device}: CUDA is not available here")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = GLMConfig.preset(config.model.preset)
    # matmul measured before and after the training steps; the best of the two is the
    # peak, so a noisy neighbour during one measurement cannot inflate the ratio
    peak = matmul_flops(args.matmul_n, 10, device, dtype)
    tps, achieved, step = train_step_flops(cfg, args.seq_len, args.micro_batch_size,
                                           args.steps, device,
                                           dtype if args.dtype == "bf16" else None)
    peak = max(peak, matmul_flops(args.matmul_n, 10, device, dtype))
    print(f"device                   {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", {args.dtype}")
    print(f"threads                  {torch.get_num_threads()}")
    print(f"{args.dtype} matmul {args.matmul_n}^3       {peak / 1e9:8.2f} GFLOP/s (measured)")
    print(f"train step ({config.model.preset}, b={args.micro_batch_size}, s={args.seq_len})  "
          f"{step * 1e3:.1f} ms, {tps:,.0f} tokens/s")
    print(f"achieved model FLOP/s    {achieved / 1e9:8.2f} GFLOP/s "
          f"({train_flops_per_token(cfg, args.seq_len) / 1e6:.1f} MFLOP/token)")
    print(f"ratio achieved / matmul  {achieved / peak:8.1%}")
    datasheet, source = peak_flops(device) if device.type == "cuda" else (None, "")
    if datasheet:
        print(f"MFU vs {source:18s}{achieved / datasheet:8.1%}")



def main(argv=None):
    return COMMAND.main(run, argv)


if __name__ == "__main__":
    run_main(main)
