"""Measure this machine's fp32 matmul FLOP/s and a training step's achieved FLOP/s, side
by side in one run, and print their ratio (model FLOPs utilisation against the measured
matmul peak rather than a datasheet number).

    python runners/bench_train.py --preset small --seq-len 128 --batch 16 --steps 5
    python runners/bench_train.py --device cuda --dtype bf16 --preset base
Times are device-true (engine.timing: CUDA events on CUDA).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from engine.train.flops import train_flops_per_token
from engine.timing import Clock, peak_flops, time_fn
from model import GLM, GLMConfig
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--matmul-n", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the model and data live (default: cuda when available)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: autocast over fp32 parameters (the trainer's CUDA default); "
                         "the matmul peak is measured in the same dtype")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = GLMConfig.preset(args.preset)
    # matmul measured before and after the training steps; the best of the two is the
    # peak, so a noisy neighbour during one measurement cannot inflate the ratio
    peak = matmul_flops(args.matmul_n, 10, device, dtype)
    tps, achieved, step = train_step_flops(cfg, args.seq_len, args.batch, args.steps, device,
                                           dtype if args.dtype == "bf16" else None)
    peak = max(peak, matmul_flops(args.matmul_n, 10, device, dtype))
    print(f"device                   {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", {args.dtype}")
    print(f"threads                  {torch.get_num_threads()}")
    print(f"{args.dtype} matmul {args.matmul_n}^3       {peak / 1e9:8.2f} GFLOP/s (measured)")
    print(f"train step ({args.preset}, b={args.batch}, s={args.seq_len})  "
          f"{step * 1e3:.1f} ms, {tps:,.0f} tokens/s")
    print(f"achieved model FLOP/s    {achieved / 1e9:8.2f} GFLOP/s "
          f"({train_flops_per_token(cfg, args.seq_len) / 1e6:.1f} MFLOP/token)")
    print(f"ratio achieved / matmul  {achieved / peak:8.1%}")
    datasheet, source = peak_flops(device) if device.type == "cuda" else (None, "")
    if datasheet:
        print(f"MFU vs {source:18s}{achieved / datasheet:8.1%}")


if __name__ == "__main__":
    run_main(main)
