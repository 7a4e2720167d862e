"""One recipe stage = one workflow (engine/recipe/workflows) with the command line a user
gives its runner, so the report exercises exactly what a user runs. Single-process stages
call the workflow's main(argv) in this process (no interpreter + torch start-up per
stage); pipeline stages (pp > 1) run runners/<name>.py under torchrun, one process per
stage, 1 thread each: that launch is the library's only use of a runner file."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class StageError(RuntimeError):
    pass


def _workflow(name: str):
    return importlib.import_module(f"engine.recipe.workflows.{name}")


def _tail(path: str, n: int = 15) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-n:])


def run_stage(name: str, argv: list[str], log_path: str, nproc: int = 1) -> None:
    """Run workflow <name> with the command line argv; its output goes to log_path.
    Raises StageError with the log's tail when the stage fails."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    if nproc == 1:
        import torch
        threads = torch.get_num_threads()
        with open(log_path, "w", encoding="utf-8") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                _workflow(name).main(argv)
                code = 0
            except SystemExit as e:       # workflows exit with "error: ..." on bad input
                code = e.code
                if code not in (0, None):
                    print(code)
            finally:
                torch.set_num_threads(threads)   # a workflow may have changed it
        if code not in (0, None):
            raise StageError(f"stage {name} failed:\n{_tail(log_path)}")
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(ROOT, "runners", f"{name}.py"), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc:
        raise StageError(f"stage {name} (torchrun x{nproc}) failed, rc={rc}:\n"
                         f"{_tail(log_path)}")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def dev_curve(run_dir: str) -> list[tuple[int, float]]:
    """(step, dev loss) from a run's metrics.jsonl."""
    out = []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "dev_loss" in r:
                out.append((int(r["step"]), float(r["dev_loss"])))
    return out
