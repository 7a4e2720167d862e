"""Plan a parallel layout: every valid tp x pp x dp (x vpp, micro-batch size, recompute,
ZeRO stage) with its predicted memory and step time, best first (engine/planner/command.py).

    python runners/plan.py --help      # every --section.field, its default and meaning
    python runners/plan.py --model.preset chatglm3-6b --plan.gpus 8 --plan.memory_gb 80
    python runners/plan.py --model.preset glm4-9b --plan.gpus 16 --json   # the layout alone
"""
from engine.errors import run_main
from engine.planner.command import main

if __name__ == "__main__":
    run_main(main)
