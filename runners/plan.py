"""Plan a parallel layout: enumerate every valid tp x pp x dp (x vpp, micro-batch size,
recompute, ZeRO stage), predict per-device memory and step time, print them best first.

    python runners/plan.py --model chatglm3-6b --gpus 8 --gpu-mem 80
    python runners/plan.py --model chatglm3-6b --gpus 16 --gpu-mem 80 --seq-len 8192 \\
        --global-batch 128 --device a100 --top 30
    python runners/plan.py --model small --gpus 1 --device cpu --threads 1 \\
        --seq-len 128 --global-batch 4 --validate   # also run each layout here, compare

`--device cpu` measures this machine (calibrate()); named profiles are h100 and a100.
A runner that trains calls engine.planner.choose_layout() instead (--parallel auto).
"""
from __future__ import annotations

import argparse
import json
import sys

from engine.planner import PlanRequest, best, device_profile, format_table, plan
from engine.planner.explain import LEGEND, launch_flags
from engine.errors import fail, run_main

GB = 1e9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and batch")
    g.add_argument("--model", default="chatglm3-6b", help="GLMConfig preset name")
    g.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    g.add_argument("--global-batch", type=int, default=64,
                   help="sequences per optimizer step over all data-parallel ranks")
    g = p.add_argument_group("machine")
    g.add_argument("--gpus", type=int, default=8, help="world size")
    g.add_argument("--gpus-per-node", type=int, default=8,
                   help="devices per node (tensor parallelism stays inside one)")
    g.add_argument("--gpu-mem", type=float, default=None,
                   help="GB per device (default: the device profile's)")
    g.add_argument("--device", default="h100",
                   help="h100 | a100 | cpu (cpu: measured now)")
    g.add_argument("--threads", type=int, default=0,
                   help="cpu: torch threads for calibration and --validate (0: torch's "
                        "default; 1 on a shared machine, where extra threads mostly wait)")
    g = p.add_argument_group("search space")
    g.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="default: the device's (bf16 on GPUs, fp32 on cpu)")
    g.add_argument("--kernels", choices=("fused", "torch"), default=None,
                   help="default: the device's (fused Triton on GPUs, torch on cpu)")
    g.add_argument("--no-sequence-parallel", action="store_true",
                   help="keep norms and residual replicated over tp")
    g.add_argument("--max-micro-batch", type=int, default=16)
    g.add_argument("--zero-stages", default="0,1,2", help="comma-separated ZeRO stages")
    g = p.add_argument_group("output")
    g.add_argument("--top", type=int, default=25, help="rows to print (0: all)")
    g.add_argument("--json", action="store_true",
                   help="print only the chosen layout as JSON on stdout (the report goes "
                        "to stderr)")
    g.add_argument("--validate", action="store_true",
                   help="(single device) run every printed layout here, compare memory "
                        "and step time with the prediction")
    return p.parse_args(argv)


def _validate(req, cands, out):
    from engine.planner.measure import measure_layouts
    runnable = [c for c in cands if (c.layout.tp, c.layout.pp, c.layout.dp) == (1, 1, 1)]
    got = measure_layouts([(req, c.layout) for c in runnable])
    print(f"\n{'layout':<30} {'pred MB':>9} {'meas MB':>9} {'err':>7} {'act pred':>9} "
          f"{'act meas':>9} {'pred s':>8} {'meas s':>8}", file=out)
    for c, g in zip(runnable, got):
        pm = c.memory.peak
        pred = pm.states_and_activations
        print(f"{c.layout.short():<30} {pred / 1e6:>9.2f} {g.total / 1e6:>9.2f} "
              f"{pred / g.total - 1:>+7.2%} {pm.activations / 1e6:>9.2f} "
              f"{g.activations / 1e6:>9.2f} {c.time.total:>8.3f} {g.step_time:>8.3f}",
              file=out)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        dev = device_profile(args.device)
        req = PlanRequest(
            args.model, args.gpus,
            args.gpu_mem if args.gpu_mem is not None else dev.memory_bytes / GB,
            args.seq_len, args.global_batch, gpus_per_node=args.gpus_per_node,
            precision=args.precision or dev.precision, kernels=args.kernels or dev.kernels,
            sequence_parallel=not args.no_sequence_parallel,
            max_micro_batch=args.max_micro_batch,
            zero_stages=tuple(int(z) for z in args.zero_stages.split(",") if z.strip()))
        cands = plan(req, dev)
    except ValueError as e:
        fail(e)
    n_fit = sum(c.fits for c in cands)
    # --json: stdout carries the JSON alone (for a pipe or a script); the report goes to stderr
    out = sys.stderr if args.json else sys.stdout
    print(f"{req.model_name or 'model'}: {args.gpus} x {req.device_memory_gb:.4g} GB "
          f"({dev.name}, {dev.reserved_bytes / GB:g} GB reserved), seq {req.seq_len}, "
          f"global batch {req.global_batch}, {req.precision} / {req.kernels} kernels: "
          f"{len(cands)} valid layouts, {n_fit} fit", file=out)
    print(format_table(cands, top=args.top or None), file=out)
    print("\n" + LEGEND, file=out)
    try:
        chosen = best(cands)
    except ValueError as e:
        fail(e)
    t = chosen.time
    print(f"\nchosen: {chosen.layout.short()}  ({chosen.memory.peak.total / GB:.1f} GB on "
          f"stage {chosen.memory.peak.stage}; step {t.total:.3f} s = gemm {t.gemm:.3f} + "
          f"elementwise {t.elementwise:.3f} + overhead {t.overhead:.3f} + tp {t.tp:.3f} + "
          f"p2p {t.p2p:.3f} + bubble {t.bubble:.3f} + dp {t.dp:.3f} + optimizer "
          f"{t.optimizer:.3f}; {t.tokens_per_s:,.0f} tokens/s)", file=out)
    nodes = -(-args.gpus // args.gpus_per_node)
    where = f" (the same line on each of the {nodes} nodes)" if nodes > 1 else ""
    flags = launch_flags(chosen.layout, req.seq_len, req.model_name or None,
                         gpus_per_node=args.gpus_per_node)
    print(f"\nto train with it{where}:\n{flags}", file=out)
    if args.json:
        print(json.dumps(chosen.layout.as_dict()))
    if args.validate:
        _validate(req, cands[:args.top] if args.top else cands, out)


if __name__ == "__main__":
    run_main(main)
