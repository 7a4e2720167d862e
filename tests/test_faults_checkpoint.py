"""Fault tests: checkpoints are never lost and a run reads only what it can verify.

Each scenario is reproduced deterministically (a crash injected at a named phase of a
save, divergence by a huge lr, a second run in the same out_dir, each kind of
corruption, a disk that fills up during a write) through the runners' own entry points,
in-process on the tiny preset. Each asserts the exit code, the one-line message, and
that every complete checkpoint's files are byte-identical before and after."""
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from engine.train import checkpoint as ckpt_lib
from engine.train import faults, run_dir
from engine.recipe.data.shards import write_shard
from engine.train.divergence import DivergenceError, DivergenceGuard, NonFiniteLossError
from model.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model.preset", "tiny", "--train.micro_batch_size", "2", "--train.seq_len", "32",
        "--train.log_every", "1", "--train.eval_every", "0", "--train.warmup_steps", "1",
        "--train.threads", "1", "--train.save_every", "2"]


def _lines(seed: int, n: int = 300) -> list[str]:
    words = ["open", "file", "save", "error", "disk", "full", "cannot", "read", "write",
             "文件", "打开", "保存", "错误", "磁盘"]
    return [" ".join(words[(i * 7 + j * (seed + 3)) % len(words)] for j in range(3 + i % 6))
            + f" {i % 17}" for i in range(n)]


def _make_data(root, seed: int = 0):
    """A prepared data folder in miniature: tokenizer, pretrain and translation shards,
    manifest (what runners/prepare_data.py writes, from synthetic text in a second)."""
    tok = Tokenizer.train(_lines(seed), root / "tokenizer", vocab_size=400)
    shards = root / "shards"
    ids = tok.encode_batch(_lines(seed, 120))
    for split in ("train", "dev"):
        write_shard(shards / f"pretrain_{split}", [a + b for a, b in zip(ids[::2], ids[1::2])],
                    vocab_size=tok.vocab_size, tokenizer_sha256=tok.sha256)
        write_shard(shards / f"translation_{split}", list(zip(ids[::2], ids[1::2])),
                    vocab_size=tok.vocab_size, tokenizer_sha256=tok.sha256,
                    fields=("en", "zh"))
    (root / "manifest.json").write_text(json.dumps({"tokenizer_sha256": tok.sha256}))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _make_data(tmp_path_factory.mktemp("faults") / "data")


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    return _make_data(tmp_path_factory.mktemp("faults_other") / "data", seed=5)


def pretrain(data, out, *extra, steps=4):
    """The pretrain workflow's command line (runners/pretrain.py) in-process: (exit code,
    stdout+stderr lines, seconds)."""
    import contextlib
    import io

    from engine.recipe.workflows.pretrain import main
    buf = io.StringIO()
    t0 = time.perf_counter()
    code = 0
    with contextlib.redirect_stdout(buf):
        try:
            main([*TINY, "--data.dir", str(data), "--train.out_dir", str(out),
                  "--train.steps", str(steps), *extra])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if e.code not in (0, None) and not isinstance(e.code, int):
                print(e.code)
    return code, buf.getvalue().splitlines(), time.perf_counter() - t0


def snapshot(out) -> dict:
    """{step dir: {file: bytes sha256}} of every complete (verifying) checkpoint."""
    store = run_dir.CheckpointStore(str(out))
    snap = {}
    for _, path in store.steps():
        try:
            ckpt_lib.Checkpoint(path)
        except ckpt_lib.CheckpointError:
            continue
        snap[os.path.basename(path)] = {
            os.path.relpath(os.path.join(r, n), path): ckpt_lib.sha256_file(os.path.join(r, n))
            for r, _, names in os.walk(path) for n in names}
    return snap


def assert_kept(before: dict, out, may_rotate: int = 0):
    """Every complete checkpoint of `before` is still there, byte for byte (up to
    `may_rotate` of the oldest removed by a rotation after a newer complete save)."""
    after = snapshot(out)
    missing = sorted(set(before) - set(after))
    assert len(missing) <= may_rotate, (missing, sorted(after))
    if missing:
        assert missing == sorted(before)[:len(missing)]
        assert len(set(after) - set(before)) >= 1
    for name in set(before) & set(after):
        assert after[name] == before[name], name
    assert after, "no complete checkpoint left"


def err_line(lines):
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    return errors[0]


class Crash(BaseException):
    """A simulated kill: not an Exception, so no cleanup handler runs."""


# ---- the layout and its pointers ------------------------------------------------------
def test_keeps_last_k_step_dirs_with_atomic_pointers(data, tmp_path):
    out = tmp_path / "run"
    code, lines, _ = pretrain(data, out, "--train.keep_checkpoints", "2", steps=6)
    assert code == 0, lines
    steps = [os.path.basename(p) for _, p in run_dir.CheckpointStore(str(out)).steps()]
    assert steps == ["step_000006", "step_000004"]
    assert (out / "checkpoints" / "latest").read_text() == "step_000006\n"
    assert os.readlink(out / "checkpoint") == os.path.join("checkpoints", "step_000006")
    ck = ckpt_lib.Checkpoint(str(out / "checkpoint"))
    assert ck.meta["step"] == 6
    # the tokenizer is inside the atomic save of every checkpoint, hashed
    tok_sha = Tokenizer(data / "tokenizer").sha256
    for _, path in run_dir.CheckpointStore(str(out)).steps():
        meta = ckpt_lib.Checkpoint(path).meta
        assert meta["files"]["tokenizer.model"] == tok_sha == meta["tokenizer_sha256"]
    assert not (out / "run.lock").exists()         # released at the end


def test_fresh_run_refuses_an_out_dir_with_checkpoints_unless_force(data, tmp_path):
    out = tmp_path / "run"
    assert pretrain(data, out)[0] == 0
    before = snapshot(out)
    code, lines, _ = pretrain(data, out)
    assert code == 1 and "already holds checkpoints" in err_line(lines)
    assert "--resume" in err_line(lines) and "--force" in err_line(lines)
    assert_kept(before, out)
    # --force: the old ones are set aside until the new run's first save, then removed
    code, lines, _ = pretrain(data, out, "--force", "--train.lr", "2e-3")
    assert code == 0, lines
    assert not (out / "checkpoints.replaced").exists()
    assert ckpt_lib.Checkpoint(str(out / "checkpoint")).meta["config"]["train"]["lr"] == 2e-3


def test_force_crash_before_first_save_keeps_the_old_checkpoints(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert pretrain(data, out)[0] == 0
    before = snapshot(out)

    def crash(name):
        if name == "save:begin":
            raise Crash(name)
    monkeypatch.setattr(faults, "point", crash)
    with pytest.raises(Crash):
        pretrain(data, out, "--force")
    replaced = out / "checkpoints.replaced"
    assert set(os.listdir(replaced)) >= set(before)
    for name, files in before.items():
        for rel, digest in files.items():
            assert ckpt_lib.sha256_file(str(replaced / name / rel)) == digest


# ---- a crash at each phase of a save ----------------------------------------------------
PHASES = ["save:begin", "save:tensors", "save:sealed", "save:renamed", "save:pointer",
          "save:linked", "save:rotating"]


@pytest.mark.parametrize("phase", PHASES)
def test_crash_at_each_phase_of_a_save_leaves_a_complete_checkpoint(data, tmp_path,
                                                                   monkeypatch, phase):
    out = tmp_path / "run"
    assert pretrain(data, out)[0] == 0                       # step_000002, step_000004
    before = snapshot(out)
    assert sorted(before) == ["step_000002", "step_000004"]

    def crash(name):
        if name == phase:
            raise Crash(name)
    monkeypatch.setattr(faults, "point", crash)
    with pytest.raises(Crash):
        pretrain(data, out, "--resume", steps=6)             # dies saving step 6
    monkeypatch.undo()
    assert_kept(before, out, may_rotate=1 if phase == "save:rotating" else 0)
    committed = PHASES.index(phase) >= PHASES.index("save:renamed")
    # the next run resumes from the newest complete one and finishes
    code, lines, _ = pretrain(data, out, "--resume", steps=6)
    assert code == 0, lines
    resumed = [ln for ln in lines if ln.startswith("resumed from")]
    assert resumed and resumed[0].endswith(f"at step {6 if committed else 4}"), lines
    assert ckpt_lib.Checkpoint(str(out / "checkpoint")).meta["step"] == 6
    assert not [n for n in os.listdir(out / "checkpoints") if n.endswith(".tmp")]


def test_killed_during_a_save_by_the_env_fault_hook(data, tmp_path):
    """The real thing: the process dies (os._exit) with the temp dir half written."""
    out = tmp_path / "run"
    assert pretrain(data, out)[0] == 0
    before = snapshot(out)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
           "ENGINE_FAULT": "save:tensors"}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "runners/pretrain.py", *TINY, "--data.dir", str(data),
                          "--train.out_dir", str(out), "--train.steps", "6", "--resume"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == faults.EXIT_CODE, stderr
    print(f"killed at save:tensors: exit {p.returncode}, {time.perf_counter() - t0:.1f} s")
    assert (out / "checkpoints" / "step_000006.tmp").is_dir()      # partial, left behind
    assert_kept(before, out)
    assert json.loads((out / "run.lock").read_text())["pid"] == p.pid   # stale record
    code, lines, _ = pretrain(data, out, "--resume", steps=6)
    assert code == 0, lines
    assert any("taking over the stale lock" in ln for ln in lines), lines
    assert any(ln.endswith("at step 4") for ln in lines if ln.startswith("resumed"))


# ---- divergence -------------------------------------------------------------------------
def test_huge_lr_stops_the_run_and_saves_nothing(data, tmp_path):
    out = tmp_path / "run"
    assert pretrain(data, out)[0] == 0
    before = snapshot(out)
    code, lines, secs = pretrain(data, out, "--resume", "--train.lr", "1000",
                                 "--train.min_lr", "1000", "--train.save_every", "1",
                                 steps=40)
    msg = err_line(lines)
    print(f"lr 1000: exit {code}, {secs:.1f} s: {msg}")
    assert code == 1 and "diverged" in msg
    assert_kept(before, out)
    assert sorted(snapshot(out)) == sorted(before)           # nothing new was saved
    # with the spike guard off the garbage is caught only by the skip streak, after it
    # was saved; the checkpoint the run resumed from is pinned, so it survives rotation
    code, lines, _ = pretrain(data, out, "--resume", "--train.lr", "1000", "--train.min_lr",
                              "1000", "--train.save_every", "1",
                              "--train.loss_spike_factor", "0", steps=40)
    assert code == 1 and "in a row skipped" in err_line(lines)
    assert snapshot(out)["step_000004"] == before["step_000004"]
    # the good checkpoint still resumes (moved back over the bad ones)
    for name in os.listdir(out / "checkpoints"):
        if name.startswith("step_") and name != "step_000004":
            shutil.rmtree(out / "checkpoints" / name)
    assert pretrain(data, out, "--resume", steps=5)[0] == 0


def test_guard_counts_fp16_backoffs_apart_and_checks_loss():
    g = DivergenceGuard(max_skipped=2)
    for step in range(10):                       # back-offs never count as divergence
        g.observe(step, 2.0, skipped=True, backoff=True)
    assert g.backoffs == 10 and not g.in_streak
    g.observe(10, 2.0, skipped=True)
    g.observe(11, 2.0, skipped=True)
    assert g.in_streak
    with pytest.raises(DivergenceError, match="3 optimizer steps in a row"):
        g.observe(12, 2.0, skipped=True)
    g = DivergenceGuard()
    with pytest.raises(NonFiniteLossError, match="loss became nan"):
        g.observe(1, float("nan"), skipped=False)
    assert issubclass(NonFiniteLossError, FloatingPointError)
    g = DivergenceGuard(spike_factor=3.0)
    for step in range(6):
        g.observe(step, 2.0, skipped=False)
    g.observe(6, 5.9, skipped=False)             # under 3 x the mean (2.0)
    with pytest.raises(DivergenceError, match="loss_spike_factor=3"):
        g.observe(7, 9.0, skipped=False)         # over 3 x the mean (2.56)
    with pytest.raises(DivergenceError, match="not saved"):
        g.check_state(8, 100.0)
    assert DivergenceGuard(spike_factor=0).observe(1, 1e9, skipped=False) is None


def test_nonfinite_loss_stops_the_trainer_without_saving(tmp_path):
    import torch

    from engine.config import build_run_config
    from engine.pipeline.schedules import glm_forward_step
    from engine.train.trainer import Trainer
    from test_trainer import RandomTokens
    cfg = build_run_config({"train": {"steps": 4, "micro_batch_size": 2, "seq_len": 16,
                                      "save_every": 1, "out_dir": str(tmp_path / "r")}})

    def nan_loss(chunk, batch, hidden, side):
        return glm_forward_step(chunk, batch, hidden, side) * float("nan")
    tr = Trainer.from_config(cfg, RandomTokens(16), forward_step=nan_loss, log=lambda *_: None)
    with pytest.raises(NonFiniteLossError):
        tr.fit()
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


# ---- two runs in one out_dir --------------------------------------------------------------
def test_second_run_in_the_same_out_dir_refuses_naming_the_holder(data, tmp_path):
    out = tmp_path / "run"
    assert pretrain(data, out)[0] == 0
    before = snapshot(out)
    holder = run_dir.RunLock(str(out)).acquire(log=lambda *_: None, command="the first run")
    try:
        code, lines, _ = pretrain(data, out, "--resume", steps=6)
    finally:
        holder.release()
    msg = err_line(lines)
    assert code == 1 and "in use by another run" in msg and f"pid {os.getpid()}" in msg
    assert "the first run" in msg
    assert_kept(before, out)


def test_stale_lock_of_a_dead_process_is_taken_over(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    (out / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                              "started": "2026-01-01T00:00:00Z"}))
    code, lines, _ = pretrain(data, out, steps=2)
    assert code == 0, lines
    assert any("taking over the stale lock" in ln and str(dead.pid) in ln for ln in lines)
    # another host's record cannot be judged from here: refused, with the way out
    (out / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere",
                                              "started": "2026-01-01T00:00:00Z"}))
    code, lines, _ = pretrain(data, out, "--resume", steps=3)
    assert code == 1 and "host elsewhere" in err_line(lines) and "remove" in err_line(lines)


# ---- corruption -------------------------------------------------------------------------
def _newest(out):
    return run_dir.CheckpointStore(str(out)).steps()[0][1]


def test_edited_meta_step_is_refused_and_resume_falls_back(data, tmp_path):
    out = tmp_path / "run"
    assert pretrain(data, out)[0] == 0
    before = snapshot(out)
    meta_path = os.path.join(_newest(out), "meta.json")
    meta = json.load(open(meta_path))
    meta["step"] = 1
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    with pytest.raises(ckpt_lib.CheckpointError, match="was edited"):
        ckpt_lib.Checkpoint(str(out / "checkpoint"))
    code, lines, _ = pretrain(data, out, "--resume", steps=5)
    assert code == 0, lines
    warn = [ln for ln in lines if ln.startswith("warning: checkpoint")]
    assert len(warn) == 1 and "was edited" in warn[0] and "previous" in warn[0]
    assert any(ln.endswith("at step 2") for ln in lines if ln.startswith("resumed"))
    assert (out / "checkpoints" / "step_000004.bad").is_dir()     # set aside, not deleted
    assert snapshot(out)["step_000004"] != before["step_000004"]  # re-trained and re-saved
    assert ckpt_lib.Checkpoint(str(out / "checkpoint")).meta["step"] == 5


def test_corrupt_tensor_file_falls_back_and_all_corrupt_is_one_line(data, tmp_path):
    out = tmp_path / "run"
    assert pretrain(data, out)[0] == 0
    for _, path in run_dir.CheckpointStore(str(out)).steps():
        f = os.path.join(path, "model", "stage0.safetensors")
        blob = bytearray(open(f, "rb").read())
        blob[-1] ^= 0xFF
        open(f, "wb").write(bytes(blob))
    code, lines, _ = pretrain(data, out, "--resume", steps=5)
    msg = err_line(lines)
    assert code == 1 and "no usable checkpoint" in msg and "sha256 mismatch" in msg
    assert sum(ln.startswith("warning: checkpoint") for ln in lines) == 2


def test_swapped_tokenizer_is_refused_by_evaluate_and_convert(data, other_data, tmp_path):
    out = tmp_path / "run"
    assert pretrain(data, out, steps=2)[0] == 0
    ck = out / "checkpoint"
    before = snapshot(out)
    tsv = tmp_path / "t.tsv"
    tsv.write_text("open file\t打开 文件\n", encoding="utf-8")
    from engine.recipe.workflows.evaluate import main as evaluate
    # evaluate with another data dir's shards: refused, it would be a meaningless loss
    with pytest.raises(SystemExit) as e:
        evaluate(["--eval.checkpoint", str(ck), "--eval.input", str(tsv), "--data.dir",
                  str(other_data), "--eval.limit", "1", "--eval.max_new_tokens", "2",
                  "--eval.latency_samples", "1"])
    assert "written with tokenizer" in str(e.value.code)
    assert_kept(before, out)
    # a checkpoint from before tokenizers were hashed (copied in afterwards): the
    # converter checks it against tokenizer_sha256 before shipping it
    from engine.train.convert_command import main as convert
    legacy = tmp_path / "legacy"
    model = ckpt_lib.Checkpoint(_newest(out)).load("model")
    meta = {k: v for k, v in json.load(open(ck / "meta.json")).items()
            if k not in ("files", "meta_sha256", "format_version", "saved_at")}
    ckpt_lib.save_checkpoint(str(legacy), model, {}, meta)
    shutil.copy(other_data / "tokenizer" / "tokenizer.model", legacy / "tokenizer.model")
    with pytest.raises(SystemExit) as e:
        convert(["--convert.direction", "to_chatglm", "--convert.checkpoint", str(legacy),
                 "--convert.out_dir", str(tmp_path / "hf")])
    assert "is not the tokenizer" in str(e.value.code) and "not shipping" in str(e.value.code)
    assert not (tmp_path / "hf").exists()
    # a tokenizer.model swapped inside a checkpoint fails its sha256
    shutil.copy(other_data / "tokenizer" / "tokenizer.model", ck / "tokenizer.model")
    with pytest.raises(SystemExit) as e:
        evaluate(["--eval.checkpoint", str(ck), "--eval.input", str(tsv)])
    assert "tokenizer.model is corrupt" in str(e.value.code)


def test_data_dir_whose_tokenizer_does_not_match_its_shards(data, other_data, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(data, mixed)
    shutil.copy(other_data / "tokenizer" / "tokenizer.model",
                mixed / "tokenizer" / "tokenizer.model")
    code, lines, _ = pretrain(mixed, tmp_path / "run", steps=2)
    assert code == 1 and "written with tokenizer" in err_line(lines)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- a full disk ------------------------------------------------------------------------
def test_disk_full_during_a_write_removes_partial_files(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert pretrain(data, out)[0] == 0
    before = snapshot(out)
    real = ckpt_lib.save_file

    def full_disk(tensors, dest):
        real(tensors, dest)
        with open(dest, "r+b") as f:            # what a full disk leaves: a short file
            f.truncate(os.path.getsize(dest) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dest)
    monkeypatch.setattr(ckpt_lib, "save_file", full_disk)
    code, lines, _ = pretrain(data, out, "--resume", steps=6)
    msg = err_line(lines)
    assert code == 1 and "No space left on device" in msg and "step 6 not saved" in msg
    assert not [n for n in os.listdir(out / "checkpoints") if n.endswith(".tmp")]
    assert_kept(before, out)
    monkeypatch.undo()
    assert pretrain(data, out, "--resume", steps=6)[0] == 0


def test_free_space_is_checked_before_writing(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert pretrain(data, out)[0] == 0
    before = snapshot(out)
    usage = shutil.disk_usage(str(out))
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: usage._replace(free=1000))
    code, lines, _ = pretrain(data, out, "--resume", steps=6)
    msg = err_line(lines)
    assert code == 1 and "not enough free space" in msg and "MiB" in msg
    assert not [n for n in os.listdir(out / "checkpoints") if n.endswith(".tmp")]
    assert_kept(before, out)


# ---- what a resume reads --------------------------------------------------------------
def test_resume_with_another_schedule_warns_in_one_line(data, tmp_path):
    out = tmp_path / "run"
    assert pretrain(data, out)[0] == 0
    code, lines, _ = pretrain(data, out, "--resume", steps=8)
    assert code == 0
    warn = [ln for ln in lines if "another LR schedule" in ln]
    assert len(warn) == 1 and "steps 4 -> 8" in warn[0] and "from step 4 on" in warn[0]


def test_legacy_checkpoint_dir_is_adopted_on_resume(data, tmp_path):
    out = tmp_path / "run"
    assert pretrain(data, out, steps=2)[0] == 0
    # the old layout: out_dir/checkpoint as a real directory
    os.unlink(out / "checkpoint")
    os.rename(_newest(out), out / "checkpoint")
    shutil.rmtree(out / "checkpoints")
    before = {"step_000002": snapshot_dir(out / "checkpoint")}
    code, lines, _ = pretrain(data, out, "--resume", steps=3)
    assert code == 0, lines
    assert any(ln.endswith("at step 2") for ln in lines if ln.startswith("resumed"))
    assert snapshot(out)["step_000002"] == before["step_000002"]
    assert os.path.islink(out / "checkpoint")


def snapshot_dir(path):
    return {os.path.relpath(os.path.join(r, n), path): ckpt_lib.sha256_file(os.path.join(r, n))
            for r, _, names in os.walk(path) for n in names}


def test_interrupted_swap_of_an_explicit_path_is_restored(tmp_path):
    """finish_save's two renames: a crash between them leaves only path.old; the next
    save puts it back first instead of deleting it."""
    import torch
    path = str(tmp_path / "ck")
    ckpt_lib.save_checkpoint(path, {"w": torch.ones(3)}, {}, {"step": 1})
    os.rename(path, path + ".old")                       # the state the crash leaves
    with pytest.raises(ckpt_lib.CheckpointError, match=r"\.old holds the previous one"):
        ckpt_lib.Checkpoint(path)
    bad = {"x": object()}
    with pytest.raises(Exception):
        ckpt_lib.save_checkpoint(path, bad, {}, {"step": 2})
    assert ckpt_lib.Checkpoint(path).meta["step"] == 1
    assert not os.path.exists(path + ".tmp")


def test_after_an_interrupted_force_only_force_deletes_what_it_set_aside(data, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "run"
    assert pretrain(data, out)[0] == 0

    def crash(name):
        if name == "save:begin":
            raise Crash(name)
    monkeypatch.setattr(faults, "point", crash)
    with pytest.raises(Crash):
        pretrain(data, out, "--force")
    monkeypatch.undo()
    code, lines, _ = pretrain(data, out)
    assert code == 1 and "checkpoints.replaced" in err_line(lines)
    code, lines, _ = pretrain(data, out, "--resume")
    assert code == 1 and "move them back" in err_line(lines)
    assert (out / "checkpoints.replaced" / "step_000004").is_dir()
    assert pretrain(data, out, "--force")[0] == 0
    assert not (out / "checkpoints.replaced").exists()
