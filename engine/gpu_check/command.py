"""runners/gpu_check.py: the one-shot check of the CUDA path on one GPU. Kernels vs the
torch references (fp16, bf16), kernel timings vs eager / SDPA / torch.compile, `base`
preset bf16 training with Triton vs torch kernels, the NCCL path under torchrun, peak
memory. Writes one JSON and one markdown file; each section is guarded, so one failure is
recorded and the rest run.

    PYTHONPATH=. python3 runners/gpu_check.py --gpu_check.out_dir runs/gpu_check  # make gpu-check
    PYTHONPATH=. python3 runners/gpu_check.py --dry-run           # the plan, no GPU
    PYTHONPATH=. python3 runners/gpu_check.py --gpu_check.sections kernels,timings \
        --gpu_check.train_steps 50"""
from __future__ import annotations

import sys

from engine.config_cli import Alias, command
from engine.gpu_check import Plan, describe

COMMAND = command(
    __doc__, {"gpu_check": Plan},
    flags={"--dry-run": "print the plan and exit (needs no GPU, writes nothing)"},
    aliases={"--out": Alias("gpu_check.out_dir"),
             "--sections": Alias("gpu_check.sections", many=True),
             "--train-steps": Alias("gpu_check.train_steps"),
             "--timing-budget": Alias("gpu_check.timing_budget_s")})


def run(config, dry_run: bool = False) -> int:
    from engine.gpu_check import run as run_check
    plan = config.gpu_check
    if dry_run:
        print("\n".join(describe(plan)))
        return 0
    try:
        report = run_check(plan)
    except RuntimeError as err:   # no CUDA device: one line, not a traceback
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    failed = [n for n, s in report["sections"].items() if not s.get("ok")]
    print(f"wrote {plan.out_dir}/gpu_check.json and gpu_check.md in "
          f"{report['total_seconds']} s"
          + (f"; failed sections: {', '.join(failed)}" if failed else "; every section ok"))
    return 1 if failed else 0


def main(argv=None) -> int:
    return COMMAND.main(run, argv)
