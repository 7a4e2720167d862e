"""runners/report.py: regenerate the paper's experiments (Tables 4-5, Figures 3-5) at
small scale on CPU: runs the recipe (base model, hybrid fine-tuning strategies, pipeline
training, pruning, continued distillation, schedule timing), then writes reports/*.md and
PNG plots.

    # make paper: on make demo's teacher (no base stage)
    python runners/report.py --report.base runs/demo/translate/checkpoint
    # or a base fine-tuned here from a pretrained LM (make demo's)
    python runners/report.py --report.pretrained runs/demo/pretrain/checkpoint
    python runners/report.py --report.quick true     # smoke run (tiny, from scratch), a minute
    python runners/report.py --report.scale 0.5 ...  # half the training steps of either
    python runners/report.py --report.seeds 1 ...    # the claims' runs once (default 3 seeds)
    make paper                                       # pretrains first if make demo has not

Plots need matplotlib (pip install -e ".[report]"); without it the markdown tables are
still written and say the plots were skipped. Numbers come from the runs (results.json
beside the tables), never typed in."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from engine.config_cli import Alias, command


@dataclass
class ReportRun:
    quick: bool = False            # tiny smoke run (about a minute)
    scale: float = 1.0             # multiply every step count
    out_dir: str = "reports"       # folder for the markdown and plots
    work_dir: str = "runs/paper"   # checkpoints and stage logs
    # pretrained LM checkpoint the base model starts from (e.g. runs/demo/pretrain/checkpoint);
    # without it the base trains from scratch, which at the full size's budget does not
    # learn to translate
    pretrained: str = ""
    # a trained translation checkpoint to use as the base instead of training one from
    # `pretrained` (make paper: make demo's teacher, runs/demo/translate/checkpoint); the
    # fine-tunings and distillations then use ReportConfig.on_teacher's settings
    base: str = ""
    threads: int = 2               # torch intra-op threads (one process)
    # run the comparisons behind the paper's claims (pruning method, fine-tuning strategy,
    # student vs teacher) with this many seeds; their tables show mean (min..max) and
    # whether each difference exceeds the seed spread
    seeds: int = 3

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"report.scale={self.scale} must be > 0")
        if self.threads < 1:
            raise ValueError(f"report.threads={self.threads} must be >= 1")
        if self.seeds < 1:
            raise ValueError(f"report.seeds={self.seeds} must be >= 1")
        if self.quick and self.base:
            raise ValueError("report.base needs the full size: report.quick is the tiny "
                             "preset from scratch")


@dataclass
class ReportData:
    dir: str = "data"              # prepared data (runners/prepare_data.py)


_OLD = {"--scale": "scale", "--out": "out_dir", "--work-dir": "work_dir",
        "--pretrained": "pretrained", "--threads": "threads", "--seeds": "seeds"}
COMMAND = command(
    __doc__, {"report": ReportRun, "data": ReportData},
    flags={"--resume": "reuse the stages a previous run with the same settings finished in "
                       "report.work_dir (evaluation and Figure 3 run again)"},
    aliases={"--quick": Alias("report.quick", switch=True),
             "--data-dir": Alias("data.dir"),
             **{k: Alias(f"report.{v}") for k, v in _OLD.items()}})


def run(config, resume: bool = False):
    import torch

    from engine.recipe.reports.budget import ReportConfig
    from engine.recipe.reports.recipe import Recipe
    from engine.recipe.reports.write import write_reports

    r = config.report
    kw = dict(out_dir=r.out_dir, work_dir=r.work_dir, data_dir=config.data.dir,
              threads=r.threads, pretrained=r.pretrained, seeds=r.seeds)
    rc = (ReportConfig.quick(**kw) if r.quick else
          ReportConfig.on_teacher(r.base, **kw) if r.base else ReportConfig(**kw))
    rc = rc.scaled(r.scale) if r.scale != 1.0 else rc
    if not os.path.isfile(os.path.join(rc.data_dir, "manifest.json")):
        raise ValueError(f"no prepared data in {rc.data_dir}: run `make data` first")
    torch.set_num_threads(rc.threads)
    t0 = time.perf_counter()
    results = Recipe(rc, log=lambda m: print(m, flush=True), resume=resume).run()
    written = write_reports(results, rc.out_dir)
    print(f"wrote {', '.join(written['markdown'] + written['plots'])} to {rc.out_dir} "
          f"in {time.perf_counter() - t0:.0f} s")
    if written["plots_skipped"]:
        print(written["plots_skipped"])


def main(argv=None):
    from engine.errors import fail
    from engine.recipe.reports.stages import StageError
    try:
        return COMMAND.main(run, argv)
    except StageError as e:       # a failed stage: its log's tail, as one error
        fail(e)
