"""Regenerate the paper's experiments (Tables 4-5, Figures 3-5) at small scale on CPU:
runs the recipe (base model, hybrid fine-tuning strategies, pipeline training, pruning,
continued distillation, schedule timing), then writes reports/*.md and PNG plots.

    # full: the small preset from a pretrained LM (make demo's), ~1 h on 2 busy cores
    python runners/report.py --pretrained runs/demo/pretrain/checkpoint
    python runners/report.py --quick          # smoke run (tiny, from scratch), about a minute
    python runners/report.py --scale 0.5 ...  # half the training steps of either
    python runners/report.py --seeds 1 ...    # the claims' runs once (default 3 seeds)
    make paper                                # pretrains first if make demo has not

Plots need matplotlib (pip install -e ".[report]"); without it the markdown tables are
still written and say the plots were skipped. Numbers come from the runs (results.json
beside the tables), never typed in.
"""
from __future__ import annotations

import argparse
import os
import time

from engine.errors import fail, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (about a minute)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    p.add_argument("--out", default="reports", help="folder for the markdown and plots")
    p.add_argument("--work-dir", default="runs/paper", help="checkpoints and stage logs")
    p.add_argument("--data-dir", default="data", help="prepared data (prepare_data.py)")
    p.add_argument("--pretrained", default="",
                   help="pretrained LM checkpoint the base model starts from (e.g. "
                        "runs/demo/pretrain/checkpoint); without it the base trains from "
                        "scratch, which at the full size's budget does not learn to "
                        "translate")
    p.add_argument("--threads", type=int, default=2, help="torch threads, one process")
    p.add_argument("--seeds", type=int, default=3,
                   help="run the comparisons behind the paper's claims (pruning method, "
                        "fine-tuning strategy, student vs teacher) with this many seeds; "
                        "their tables show mean (min..max) and whether each difference "
                        "exceeds the seed spread")
    p.add_argument("--resume", action="store_true",
                   help="reuse the stages a previous run with the same settings finished "
                        "in --work-dir (evaluation and Figure 3 run again)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from engine.recipe.reports.budget import ReportConfig
    from engine.recipe.reports.recipe import Recipe
    from engine.recipe.reports.stages import StageError
    from engine.recipe.reports.write import write_reports

    try:
        kw = dict(out_dir=args.out, work_dir=args.work_dir, data_dir=args.data_dir,
                  threads=args.threads, pretrained=args.pretrained, seeds=args.seeds)
        rc = ReportConfig.quick(**kw) if args.quick else ReportConfig(**kw)
        rc = rc.scaled(args.scale) if args.scale != 1.0 else rc
        if not os.path.isfile(os.path.join(rc.data_dir, "manifest.json")):
            raise ValueError(f"no prepared data in {rc.data_dir}: run `make data` first")
        torch.set_num_threads(rc.threads)
        t0 = time.perf_counter()
        results = Recipe(rc, log=lambda m: print(m, flush=True), resume=args.resume).run()
        written = write_reports(results, rc.out_dir)
    except (ValueError, StageError) as e:
        fail(e)
    print(f"wrote {', '.join(written['markdown'] + written['plots'])} to {rc.out_dir} "
          f"in {time.perf_counter() - t0:.0f} s")
    if written["plots_skipped"]:
        print(written["plots_skipped"])


if __name__ == "__main__":
    run_main(main)
