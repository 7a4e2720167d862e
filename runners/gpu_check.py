"""One-shot check of the CUDA path on one GPU: kernels vs the torch references (fp16,
bf16), kernel timings vs eager / SDPA / torch.compile, `base` preset bf16 training with
Triton vs torch kernels, the NCCL path under torchrun, peak memory. Writes one JSON and
one markdown file; each section is guarded, so one failure is recorded and the rest run.

    PYTHONPATH=. python3 runners/gpu_check.py --out runs/gpu_check     # (make gpu-check)
    PYTHONPATH=. python3 runners/gpu_check.py --dry-run                # the plan, no GPU
    PYTHONPATH=. python3 runners/gpu_check.py --sections kernels timings --train-steps 50
"""
from __future__ import annotations

import argparse
import sys

from engine.gpu_check import SECTIONS, Plan, describe, run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/gpu_check", help="folder for the JSON and markdown")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--timing-budget", type=float, default=200.0,
                    help="seconds after which the timings stop adding torch.compile rows")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    plan = Plan(out_dir=args.out, sections=tuple(args.sections), train_steps=args.train_steps,
                timing_budget_s=args.timing_budget)
    if args.dry_run:
        print("\n".join(describe(plan)))
        return 0
    try:
        report = run(plan)
    except RuntimeError as err:   # no CUDA device: one line, not a traceback
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    failed = [n for n, s in report["sections"].items() if not s.get("ok")]
    print(f"wrote {args.out}/gpu_check.json and gpu_check.md in {report['total_seconds']} s"
          + (f"; failed sections: {', '.join(failed)}" if failed else "; every section ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
