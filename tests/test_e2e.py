"""The runners end to end on real catalogue data, as a user runs them (subprocesses),
plus the one-line errors a user sees for bad input."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def run(*args, check=True):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "data"
    run("runners/prepare_data.py", "--data.dir", str(out), "--data.vocab_size", "2000")
    return out


TINY = ["--model.preset", "tiny", "--model.padded_vocab_size", "2048",
        "--train.micro_batch_size", "4", "--train.seq_len", "48", "--train.log_every", "1",
        "--train.eval_every", "2", "--train.eval_batches", "1", "--train.warmup_steps", "1"]


def test_pretrain_finetune_evaluate(data_dir, tmp_path):
    pre, ft, ev = tmp_path / "pre", tmp_path / "ft", tmp_path / "ev"
    out = run("runners/pretrain.py", *TINY, "--data.dir", str(data_dir), "--train.steps", "3",
              "--train.out_dir", str(pre)).stdout
    assert "step     3/3" in out and "dev loss" in out
    run("runners/pretrain.py", *TINY, "--data.dir", str(data_dir), "--data.task",
        "translation", "--train.steps", "2", "--train.out_dir", str(ft),
        "--train.init_from", str(pre / "checkpoint"))
    out = run("runners/evaluate.py", "--eval.checkpoint", str(ft / "checkpoint"),
              "--eval.input", str(data_dir / "pairs" / "test.tsv"), "--data.dir", str(data_dir),
              "--eval.limit", "6", "--eval.max_new_tokens", "8", "--eval.latency_samples", "2",
              "--eval.out_dir", str(ev)).stdout
    assert "| BLEU |" in out
    result = json.load(open(ev / "eval.json"))
    assert result["n_sentences"] == 6 and result["params"] > 0
    assert 0 <= result["bleu"] <= 100 and result["dev_ppl"] > 1 and result["heldout_loss"] > 0
    meta = json.load(open(ft / "checkpoint" / "meta.json"))
    assert meta["step"] == 2 and meta["data_position"] == {"step": 2}

    # compression: prune the fine-tuned model to ~half its layers, distil, evaluate
    st = tmp_path / "student"
    out = run("runners/prune.py", "--prune.teacher", str(ft / "checkpoint"), "--data.dir",
              str(data_dir), "--prune.out_dir", str(st / "pruned"), "--prune.layers", "2",
              "--prune.keep", "0.5", "--prune.calib_batches", "2",
              "--prune.micro_batch_size", "2", "--prune.seq_len", "48").stdout
    assert "adjusted rope_ratio" in out and "{" not in out    # every printed value labelled
    kept = json.load(open(st / "pruned" / "meta.json"))["pruning"]["selection"]["layers"]
    assert f"layers  kept {', '.join(map(str, kept))} of 0..3" in out and len(kept) == 2
    run("runners/distill.py", "--distill.teacher", str(ft / "checkpoint"), "--distill.student",
        str(st / "pruned"), "--data.dir", str(data_dir), "--train.steps", "2",
        "--train.micro_batch_size", "4", "--train.seq_len", "48", "--train.eval_batches", "1",
        "--train.out_dir", str(st / "kd"))
    out = run("runners/evaluate.py", "--eval.checkpoint", str(st / "kd" / "checkpoint"),
              "--eval.input", str(data_dir / "pairs" / "test.tsv"), "--eval.limit", "4",
              "--eval.max_new_tokens", "4", "--eval.latency_samples", "1",
              "--eval.name", "student").stdout
    student = json.load(open(st / "kd" / "checkpoint" / "meta.json"))
    assert student["config"]["model"]["num_layers"] == 2 and "| student |" in out

    # a resumed run continues from the saved step
    out = run("runners/pretrain.py", *TINY, "--data.dir", str(data_dir), "--train.steps", "4",
              "--train.out_dir", str(pre), "--resume").stdout
    assert "resumed from" in out and "at step 3" in out and "step     4/4" in out


def _one_line_error(p, *needles):
    assert p.returncode != 0
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_input_gives_one_line_errors(data_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(run("runners/pretrain.py", *TINY, "--data.dir", str(empty), check=False),
                    "prepare_data")
    _one_line_error(run("runners/pretrain.py", "--train.stepz", "3", check=False),
                    "unknown train field")
    _one_line_error(run("runners/pretrain.py", "--model.num_attention_heads", "3",
                        check=False), "num_attention_heads=3")
    # a malformed TSV line
    bad = tmp_path / "bad.tsv"
    bad.write_text("Open file\t打开文件\nno tab on this line\n", encoding="utf-8")
    ck = tmp_path / "pre"
    run("runners/pretrain.py", *TINY, "--data.dir", str(data_dir), "--train.steps", "1",
        "--train.out_dir", str(ck))
    _one_line_error(run("runners/evaluate.py", "--eval.checkpoint", str(ck / "checkpoint"),
                        "--eval.input", str(bad), check=False), "bad.tsv", "2")
    # a tokenizer that does not belong to the checkpoint
    from model.tokenizer import Tokenizer
    other = Tokenizer.train([f"line {i} 文件 {i * 7} word{i % 50}" for i in range(500)],
                            tmp_path / "other",
                            vocab_size=300)
    _one_line_error(run("runners/evaluate.py", "--eval.checkpoint", str(ck / "checkpoint"),
                        "--eval.input", str(data_dir / "pairs" / "test.tsv"),
                        "--eval.tokenizer", str(other.path), check=False),
                    "does not match")
    # a truncated checkpoint file; the checkpoint folder is left as it was
    f = ck / "checkpoint" / "model" / "stage0.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    before = sorted(os.listdir(ck / "checkpoint"))
    _one_line_error(run("runners/evaluate.py", "--eval.checkpoint", str(ck / "checkpoint"),
                        "--eval.input", str(data_dir / "pairs" / "test.tsv"), check=False),
                    "truncated")
    assert sorted(os.listdir(ck / "checkpoint")) == before
