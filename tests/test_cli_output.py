"""What the runners print and leave behind: output a person can trust (issue 18)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_print_config_prints_json_and_does_not_train(tmp_path):
    out = tmp_path / "run"
    r = _run(["runners/pretrain.py", "--config", "configs/demo_pretrain.json",
              "--print-config", "--train.out_dir", str(out), "--train.steps", "7"])
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["train"]["steps"] == 7 and cfg["train"]["out_dir"] == str(out)
    assert not out.exists() or not any(out.iterdir())


def test_score_has_no_detokenize_warning_and_same_bleu(caplog):
    from engine.recipe.evaluate import score
    refs = ["我喜欢狗."] * 120
    spaced = score(["我 喜欢 猫 ."] * 120, refs)
    with caplog.at_level("WARNING", logger="sacrebleu"):
        plain = score(["我喜欢猫."] * 120, refs)
        again = score(["我 喜欢 猫 ."] * 120, refs)
    assert "detokenize" not in caplog.text
    assert spaced["bleu"] == plain["bleu"] == again["bleu"] > 0


def test_chatglm_directory_is_recognised_and_the_converter_suggested(tmp_path):
    from engine.train.checkpoint import Checkpoint, CheckpointError
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="ChatGLM-format") as e:
        Checkpoint(str(tmp_path))
    assert f"--convert.checkpoint {tmp_path} --convert.out_dir OUT" in str(e.value)
    (tmp_path / "config.json").unlink()     # control: weights alone stay an incomplete save
    with pytest.raises(CheckpointError, match="incomplete save"):
        Checkpoint(str(tmp_path))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_and_data_files_respect_the_umask(tmp_path, umask):
    import torch
    from engine.train.checkpoint import save_checkpoint
    from engine.recipe.data.io import write_json
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"x")
    os.chmod(tok, 0o600)                      # a source the user keeps private
    old = os.umask(umask)
    try:
        save_checkpoint(str(tmp_path / "ck"), {"w": torch.zeros(2)}, {"m": torch.zeros(2)},
                        {"step": 0}, extra_files={"tokenizer.model": str(tok)})
        write_json(tmp_path / "stats.json", {"a": 1})
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for rel in ("model/model.safetensors", "optim/rank0.safetensors", "tokenizer.model",
                "meta.json"):
        assert os.stat(tmp_path / "ck" / rel).st_mode & 0o777 == want, rel
    assert os.stat(tmp_path / "stats.json").st_mode & 0o777 == want


def test_plan_ranks_fitting_layouts_first():
    from engine.planner import PlanRequest, device_profile, plan
    # 20 GB per device: the fastest layouts of a 6B model do not fit, slower ones do
    cands = plan(PlanRequest("chatglm3-6b", 8, 20, 2048, 64), device_profile("h100"))
    fits = [c.fits for c in cands]
    assert any(fits) and not all(fits)
    assert fits == sorted(fits, reverse=True)          # every fitting row above every other
    assert min(c.time.total for c in cands if not c.fits) < cands[0].time.total
    fit_times = [c.time.total for c in cands if c.fits]
    assert fit_times == sorted(fit_times)


def test_plan_json_prints_json_only():
    r = _run(["runners/plan.py", "--model.preset", "chatglm3-6b", "--plan.gpus", "8",
              "--plan.memory_gb", "80", "--plan.top", "3", "--json"])
    assert r.returncode == 0, r.stderr
    layout = json.loads(r.stdout)                    # the whole of stdout is one JSON object
    assert layout["tp"] * layout["pp"] * layout["dp"] == 8
    assert "chosen:" in r.stderr and "valid layouts" in r.stderr


def test_plan_explains_its_columns_and_prints_flags_that_build_the_layout():
    import re
    import shlex
    from engine.config import build_run_config, parse_overrides
    r = _run(["runners/plan.py", "--model.preset", "chatglm3-6b", "--plan.gpus", "16",
              "--plan.memory_gb", "40", "--plan.seq_len", "2048", "--plan.global_batch_size",
              "64", "--plan.top", "40", "--json"])
    assert r.returncode == 0, r.stderr
    chosen = json.loads(r.stdout)
    report = r.stderr
    # every token the layout column uses is in the legend
    layouts = re.findall(r"^ *\d+[ *](tp\d.*?)\s{2,}", report, re.M)
    tokens = {re.sub(r"\d+(x\d+)?$", "", t) for lay in layouts for t in lay.split()}
    assert {"tp", "pp", "dp", "mbs"} <= tokens
    legend = report[report.index("\nlayout: "):]
    for t in tokens:
        assert re.search(rf"\b{t}(N|M|\b)", legend), t
    for col in ("fits:", "mem GB:", "step s:", "bubble:", "tok/s:"):
        assert col in legend
    # the paste-ready command reproduces the chosen layout through the config parser
    cmd = report[report.index("torchrun --nnodes"):].replace("\\\n", " ")
    args = shlex.split(cmd.splitlines()[0])
    # 16 GPUs, 8 per node (plan.py's default): two nodes of 8 processes
    assert args[args.index("--nnodes") + 1] == "2"
    assert args[args.index("--nproc_per_node") + 1] == "8"
    over = parse_overrides(args[args.index("--config") + 2:])
    cfg = build_run_config({}, over)
    p, t = cfg.parallel, cfg.train
    assert (p.tp, p.pp, p.dp, p.vpp, p.zero_stage, p.sequence_parallel) == (
        chosen["tp"], chosen["pp"], chosen["dp"], chosen["vpp"], chosen["zero_stage"],
        chosen["sequence_parallel"])
    assert (t.micro_batch_size, t.num_microbatches, t.recompute, t.seq_len) == (
        chosen["micro_batch_size"], chosen["num_microbatches"], chosen["recompute"], 2048)
    if chosen["pp"] > 1:
        assert p.schedule == chosen["schedule"]
    assert cfg.model.num_layers == 28       # --model.preset chatglm3-6b
