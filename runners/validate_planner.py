"""Check the layout planner against layouts that run on this machine: train each layout
on gloo (one process per rank, one thread each), measure every rank's peak memory
(parameters + gradients + optimizer state + saved activations) and the step time, and
print them beside the planner's predictions for the same layout.

    python runners/validate_planner.py                       # small preset, 4 layers, s=64
    python runners/validate_planner.py --layers 6 --seq-len 128 --global-batch 4 --rounds 9
    python runners/validate_planner.py --only single,dp2-z1,pp2-dp2

How. One job as large as the largest layout; each layout runs on its first ranks while
the others sleep in a barrier. Memory: one metered step per layout (measured max over
ranks against predicted max over stages, and every rank against its own stage). Time:
rounds, each calibrating a CPU profile for every layout size (engine.planner.calibrate
on that many ranks at once, medians: one rank's rates, how many ranks the host runs at
them at once, gloo bandwidth, the cost of a collective between computations and the
straggler term) and then timing one step of every layout, the order rotated per round;
reported: median over rounds of the slowest rank's step, against the prediction with
the rounds' calibrations pooled (pool_profiles). Interleaving makes load that drifts
on a shared machine hit every layout and its calibration alike.
"""
from __future__ import annotations

import argparse
import sys

import torch

from engine.parallel.spawn import run_workers
from engine.errors import fail, run_main
from engine.planner.validate import HEADER, LAYOUTS, model_config, summary, validate

def spawn(fn, world: int, *args) -> list:
    """The per-rank results of fn on `world` gloo processes (no job deadline: a layout
    may be slow; every collective still times out after 300 s)."""
    return run_workers(fn, world, *args, timeout=None, pg_timeout=300)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="GLMConfig preset")
    p.add_argument("--layers", type=int, default=4, help="num_layers override (0: preset's)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=4, help="sequences per step")
    p.add_argument("--rounds", type=int, default=7,
                   help="timed steps per layout (interleaved rounds)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(LAYOUTS)}")
    p.add_argument("--margin", type=float, default=0.25,
                   help="rank only pairs the planner separates by at least this much")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(LAYOUTS)
    bad = [n for n in names if n not in LAYOUTS]
    if bad:
        sys.exit(f"error: unknown layout {bad[0]!r}; known: {', '.join(LAYOUTS)}")
    try:
        model = model_config(args.preset, args.layers).to_dict()
    except ValueError as e:
        fail(e)
    torch.set_num_threads(1)
    try:
        print(HEADER)
        rows = validate(names, model, args.seq_len, args.global_batch, args.rounds, spawn)
    except ValueError as e:
        fail(e)
    print(summary(rows, args.margin))
    if args.margin < 0.5:
        print(summary(rows, 0.5).splitlines()[0])


if __name__ == "__main__":
    run_main(main)
