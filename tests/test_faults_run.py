"""Run control as an operator meets it: torchrun pp=2 runs (tiny preset, gloo) that are
stopped by SIGTERM, stopped twice, killed with -9, or given a bad config. Each asserts the
exit code, the one line each rank prints, and that checkpoint files that existed before
are byte-identical afterwards (or, for a graceful stop, the saved step and a resume).

Per-rank output comes from torchrun's own log files (--log-dir, --redirects 3), so each
rank's stderr is checked separately."""
import glob
import json
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dist import free_port
from test_data import _synthetic_catalogs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TINY = ["--train.micro_batch_size", "2", "--train.seq_len", "32", "--train.eval_every", "0",
        "--train.log_every", "1", "--train.warmup_steps", "1", "--parallel.pp", "2"]


def _env():
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    env.pop("GLM_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from engine.recipe.data.prepare import PrepareConfig, prepare
    root = tmp_path_factory.mktemp("faults")
    _synthetic_catalogs(root / "locale")
    prepare(PrepareConfig(out=str(root / "data"), vocab_size=350, test_catalogs=("wget",),
                          min_train=100, roots=[str(root / "locale")], dev_fraction=0.05),
            log=lambda m: None)
    return root / "data"


def _digests(path):
    return {f: hashlib.sha256(open(f, "rb").read()).hexdigest()
            for f in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True))
            if os.path.isfile(f)}


class Torchrun:
    """torchrun --nproc_per_node 2 runners/pretrain.py ..., each rank's output in files."""

    def __init__(self, tmp, *args):
        self.logs = os.path.join(tmp, f"logs{time.monotonic_ns()}")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port",
             str(free_port()), "--log-dir", self.logs, "--redirects", "3",
             "runners/pretrain.py", *args],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.started = time.monotonic()

    def _file(self, rank, name):
        found = glob.glob(os.path.join(self.logs, "**", "attempt_0", str(rank), name),
                          recursive=True)
        return found[0] if found else None

    def out(self, rank=0, name="stdout.log"):
        f = self._file(rank, name)
        return open(f, encoding="utf-8", errors="replace").read() if f else ""

    def err(self, rank):
        return self.out(rank, "stderr.log")

    def worker_pid(self, rank):
        for pid in subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                                  text=True).stdout.split():
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        raise AssertionError(f"no worker with RANK={rank}")

    def wait_for(self, pattern, rank=0, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.findall(pattern, self.out(rank))
            if m:
                return m
            assert self.proc.poll() is None, (self.proc.communicate(), self.err(0),
                                              self.err(1))
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in rank {rank}'s output:\n{self.out(rank)}")

    def finish(self, timeout=60.0):
        """(exit code, seconds from `since` until torchrun and every worker exited)."""
        try:
            self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode


def _error_lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def stopped(data_dir, tmp_path_factory):
    """A fresh pp=2 run that only rank 1 (stage 1) is told to stop, with SIGTERM."""
    tmp = tmp_path_factory.mktemp("stopped")
    out = str(tmp / "run")
    run = Torchrun(tmp, *TINY, "--data.dir", str(data_dir), "--train.steps", "100000",
                   "--train.out_dir", out, "--parallel.timeout_s", "20")
    run.wait_for(r"step +5/")
    pid = run.worker_pid(1)
    at_signal = int(re.findall(r"step +(\d+)/", run.out(0))[-1])
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    run.wait_for(r"stopped by")
    said = time.monotonic() - t0
    code = run.finish()
    return run, code, (said, time.monotonic() - t0), out, at_signal


def _copy_of(stopped, tmp):
    """The stopped run's out_dir, copied for a test that must leave it as it was."""
    out = os.path.join(str(tmp), "run")
    shutil.copytree(stopped[3], out, ignore=shutil.ignore_patterns("logs*"))
    return out


def test_sigterm_to_one_rank_stops_every_rank_at_one_step(stopped):
    run, code, (said, seconds), out, at_signal = stopped
    assert code == 0, (run.err(0), run.err(1))
    last = run.out(0).strip().splitlines()[-1]
    m = re.fullmatch(r"stopped by SIGTERM \(sent to another rank\) after step (\d+)/100000: "
                     rf"saved {re.escape(out)}/checkpoints/step_0*\1 \(continue with --resume\)", last)
    assert m, last
    step = int(m.group(1))
    assert _error_lines(run.err(0)) == [] and _error_lines(run.err(1)) == []
    # the step that was running when rank 1 got the signal, or the one after it if the
    # signal arrived after that step's stop check (a few steps of slack for rank 0's log
    # lagging rank 1 under a loaded machine)
    assert at_signal <= step <= at_signal + 3, (at_signal, step)
    print(f"SIGTERM -> line {said:.1f}s, -> every process exited {seconds:.1f}s")
    meta = json.load(open(os.path.join(out, "checkpoint", "meta.json")))
    assert meta["step"] == step
    # the last logged step is the saved one: every rank stopped after it (a rank that ran
    # on would have deadlocked the save's collectives or the next step)
    assert int(re.findall(r"step +(\d+)/", run.out(0))[-1]) == step


def test_second_signal_exits_at_once_without_saving(data_dir, stopped, tmp_path):
    out = _copy_of(stopped, tmp_path)
    before = _digests(os.path.join(out, "checkpoint"))
    run = Torchrun(tmp_path, *TINY, "--data.dir", str(data_dir), "--train.steps", "100000",
                   "--train.out_dir", out, "--resume", "--parallel.timeout_s", "8")
    step = json.load(open(os.path.join(out, "checkpoint", "meta.json")))["step"]
    run.wait_for(rf"step +{step + 2}/")
    stage0, stage1 = run.worker_pid(0), run.worker_pid(1)
    os.kill(stage0, signal.SIGSTOP)     # rank 1 now waits on rank 0 inside a step
    try:
        os.kill(stage1, signal.SIGTERM)
        time.sleep(2.5)                 # past the window in which a repeat is the same one
        t0 = time.monotonic()
        os.kill(stage1, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{stage1}") and time.monotonic() < deadline:
            if open(f"/proc/{stage1}/stat").read().split()[2] == "Z":
                break
            time.sleep(0.01)
        seconds = time.monotonic() - t0
    finally:
        os.kill(stage0, signal.SIGCONT)
    code = run.finish()
    print(f"second SIGTERM -> rank 1 exited {seconds:.2f}s; torchrun exit {code}")
    assert seconds < 1.0, seconds
    assert _error_lines(run.err(1)) == ["error: rank 1: second SIGTERM: exiting now, "
                                        "without saving"]
    assert len(_error_lines(run.err(0))) <= 1
    assert code != 0
    assert _digests(os.path.join(out, "checkpoint")) == before


def test_killed_rank_is_named_by_the_survivor_within_the_deadline(data_dir, stopped,
                                                                 tmp_path):
    # dp=2: every exchange is a collective (the gradient, norm and loss all-reduces),
    # which by itself would name only the group; the pp=2 checkpoint loads into it
    out = _copy_of(stopped, tmp_path)
    before = _digests(os.path.join(out, "checkpoint"))
    run = Torchrun(tmp_path, *TINY, "--data.dir", str(data_dir), "--train.steps", "100000",
                   "--train.out_dir", out, "--resume", "--parallel.timeout_s", "10",
                   "--parallel.pp", "1")
    step = json.load(open(os.path.join(out, "checkpoint", "meta.json")))["step"]
    # the stopped run resumes where it stopped
    run.wait_for(rf"resumed from {re.escape(out)}/checkpoints/step_0*{step} at step {step}\n")
    run.wait_for(rf"step +{step + 3}/")
    t0 = time.monotonic()
    os.kill(run.worker_pid(1), signal.SIGKILL)
    code = run.finish()
    seconds = time.monotonic() - t0
    assert code != 0
    lines = _error_lines(run.err(0))
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: rank 0 (stage 0): "), lines
    # e.g. "the loss all-reduce over data-parallel ranks [0, 1] with rank 1 failed after
    # 0.0s: connection closed: ... (no heartbeat for 4.2s: dead or frozen)"
    assert re.search(r" with rank 1 failed after .*\(no heartbeat for [\d.]+s: dead or "
                     r"frozen\)", lines[0]), lines
    assert "Traceback" not in run.err(0)
    # kill -9 closes the connections: named after a few missed beats, well within the
    # deadline (10 s); the rest is the exit of rank 0 and of torchrun
    print(f"kill -9 -> every process exited {seconds:.1f}s: {lines[0]}")
    assert seconds < 10 + 5, seconds
    assert _digests(os.path.join(out, "checkpoint")) == before


@pytest.mark.parametrize("args, needle", [
    (["--train.steps", "2.5"], "train.steps=2.5 must be an integer"),
    (["--config", "{cfg}"], "train.lr='fast' must be a number"),
])
def test_bad_config_types_are_one_line(data_dir, stopped, tmp_path, args, needle):
    out = _copy_of(stopped, tmp_path)
    before = _digests(out)
    cfg = tmp_path / "bad.json"
    cfg.write_text('{"train": {"lr": "fast"}}')
    args = [a.replace("{cfg}", str(cfg)) for a in args]
    p = subprocess.run([sys.executable, "runners/pretrain.py", "--data.dir", str(data_dir),
                        "--train.out_dir", out, "--resume", *args], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert _error_lines(p.stderr) == [f"error: {needle}"], p.stderr
    assert _digests(out) == before
