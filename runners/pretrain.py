"""Train a GLM: pretraining (GLM blank infilling or causal LM on mixed EN/ZH text) or
translation fine-tuning, configured by a JSON/YAML file plus --section.field overrides.

    python runners/pretrain.py --config configs/demo_pretrain.json --train.steps 50
    torchrun --nproc_per_node 1 runners/pretrain.py --config configs/demo_pretrain.json
    python runners/pretrain.py --config ... --resume          # continue from out_dir

Sections: model (preset + GLMConfig fields), train (TrainConfig), data (DataConfig),
parallel (ParallelConfig). See engine/config.py for every field.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import build_run_config, load_file, parse_overrides  # noqa: E402
from engine.errors import fail, run_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any --section.field VALUE overrides the config file.")
    p.add_argument("--config", help="JSON or YAML run config")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in <train.out_dir>")
    p.add_argument("--force", action="store_true",
                   help="start over in an out_dir that holds checkpoints (they are removed "
                        "once this run saved its first one)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit without training")
    args, rest = p.parse_known_args(argv)
    return args, rest


def main(argv=None):
    args, rest = parse_args(argv)
    try:
        cfg = build_run_config(load_file(args.config) if args.config else {},
                               parse_overrides(rest))
    except ValueError as e:
        fail(e)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return
    from engine.train.divergence import DivergenceError
    from engine.train.launch import run_training
    try:
        run_training(cfg, resume=args.resume, force=args.force)
    except (ValueError, DivergenceError) as e:  # bad input, divergence: one line
        fail(e)


if __name__ == "__main__":
    run_main(main, graceful_stop=True)
