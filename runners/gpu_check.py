"""One-shot check of the CUDA path on one GPU: kernels, timings, training, NCCL; one JSON
and one markdown file (engine/gpu_check/command.py).

    PYTHONPATH=. python3 runners/gpu_check.py --help     # every --gpu_check.field, its default
    PYTHONPATH=. python3 runners/gpu_check.py --gpu_check.out_dir runs/gpu_check
    PYTHONPATH=. python3 runners/gpu_check.py --dry-run  # the plan, no GPU
"""
import sys

from engine.gpu_check.command import main

if __name__ == "__main__":
    sys.exit(main())
