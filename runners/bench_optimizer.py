"""Optimizer memory per rank (fp32 master weights + AdamW moments + gradients held) for
each ZeRO stage and precision, and optionally the time of a training step, at the data
parallel size this is launched with.

    python runners/bench_optimizer.py --bench.presets tiny,small                     # dp=1
    torchrun --nproc_per_node 2 runners/bench_optimizer.py --bench.presets tiny,small  # dp=2
    torchrun --nproc_per_node 2 runners/bench_optimizer.py --bench.presets small \
        --bench.steps 3
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.optim import DistributedOptimizer, OptimConfig
from model import GLM, GLMConfig
from engine.config_cli import Alias, command
from engine.errors import run_main


def time_steps(model, opt, cfg: GLMConfig, batch: int, seq_len: int, steps: int):
    """Median seconds of (forward + backward + optimizer step) and of step() alone."""
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    ids = torch.randint(0, cfg.padded_vocab_size, (batch, seq_len + 1), generator=g)
    total, step_only = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(ids[:, :-1], labels=ids[:, 1:]).sum() / ids[:, 1:].numel()
        opt.scale_loss(loss).backward()
        t1 = time.perf_counter()
        opt.step()
        if i:  # the first step allocates the buffers
            total.append(time.perf_counter() - t0)
            step_only.append(time.perf_counter() - t1)
    return statistics.median(total), statistics.median(step_only)


@dataclass
class BenchOptimizer:
    presets: list[str] = field(default_factory=lambda: ["tiny", "small"])  # model presets
    zero_stages: list[int] = field(default_factory=lambda: [0, 1, 2])  # ZeRO stages
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])  # parameter
    #                                precisions
    steps: int = 0                 # timed training steps per row (0: memory only)
    micro_batch_size: int = 2      # sequences per timed step
    seq_len: int = 64              # tokens per sequence
    bucket_mb: float = 25.0        # gradient bucket size, MB

    def __post_init__(self):
        bad = [z for z in self.zero_stages if z not in (0, 1, 2)]
        if bad:
            raise ValueError(f"bench.zero_stages: {bad[0]} is not 0, 1 or 2")
        if self.steps < 0 or self.micro_batch_size <= 0 or self.seq_len <= 0:
            raise ValueError("bench.steps must be >= 0, bench.micro_batch_size and "
                             "bench.seq_len positive")


COMMAND = command(__doc__, {"bench": BenchOptimizer}, aliases={
    "--presets": Alias("bench.presets", many=True),
    "--zero-stages": Alias("bench.zero_stages", many=True),
    "--precisions": Alias("bench.precisions", many=True), "--steps": Alias("bench.steps"),
    "--batch": Alias("bench.micro_batch_size"), "--seq-len": Alias("bench.seq_len"),
    "--bucket-mb": Alias("bench.bucket_mb")})


def run(config):
    args = config.bench
    group = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
        group = dist.group.WORLD
    rank = dist.get_rank() if group is not None else 0
    dp = dist.get_world_size() if group is not None else 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dp))
    if rank == 0:
        print(f"dp={dp}  (bytes per rank; MiB = 2**20 bytes)")
        print(f"{'preset':8} {'params':>10} {'prec':5} {'zero':>4} {'master':>9} "
              f"{'moments':>9} {'grads':>9} {'total':>9}" + ("  step_s  opt_s" if args.steps
                                                           else ""))
    for preset in args.presets:
        cfg = GLMConfig.preset(preset)
        for precision in args.precisions:
            for zero in args.zero_stages:
                model = GLM.build(cfg, seed=0)
                opt = DistributedOptimizer(model, OptimConfig(zero_stage=zero,
                                                              precision=precision,
                                                              bucket_mb=args.bucket_mb),
                                           dp_group=group)
                b = opt.state_bytes()
                line = (f"{preset:8} {model.num_params():>10,} {precision:5} {zero:>4} "
                        + " ".join(f"{v / 2 ** 20:>9.2f}" for v in
                                   (b["master"], b["exp_avg"] + b["exp_avg_sq"], b["grads"],
                                    b["total"])))
                if args.steps:
                    step_s, opt_s = time_steps(model, opt, cfg, args.micro_batch_size,
                                               args.seq_len, args.steps)
                    line += f"  {step_s:6.3f} {opt_s:6.3f}"
                if rank == 0:
                    print(line, flush=True)
    if group is not None:
        dist.destroy_process_group()



def main(argv=None):
    return COMMAND.main(run, argv)


if __name__ == "__main__":
    run_main(main)
