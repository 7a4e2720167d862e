"""runners/evaluate.py --save-hyps and its progress lines, on a tiny random checkpoint."""
import os
import subprocess
import sys

from engine.recipe.translate import Translator
from model.generate import GenerationConfig
from tiny_translation import SENTENCES, make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_save_hyps_writes_every_hypothesis_and_progress_is_shown(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    refs = [f"参考{i}" for i in range(len(SENTENCES))]
    tsv = tmp_path / "test.tsv"
    tsv.write_text("".join(f"{e}\t{z}\n" for e, z in zip(SENTENCES, refs)), encoding="utf-8")
    hyps_path = tmp_path / "out" / "hyps.tsv"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "runners/evaluate.py", "--checkpoint", ckpt,
                        "--input", str(tsv), "--max-new-tokens", "8", "--batch-size", "2",
                        "--latency-samples", "2", "--save-hyps", str(hyps_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in hyps_path.read_text(encoding="utf-8").splitlines()]
    assert [row[:2] for row in rows] == [[e, z] for e, z in zip(SENTENCES, refs)]
    want = Translator.load(ckpt, device="cpu").translate(SENTENCES,
                                                          GenerationConfig(max_new_tokens=8))
    assert [row[2] for row in rows] == [" ".join(h.split()) for h in want]
    assert f"wrote {len(SENTENCES)} hypotheses" in r.stdout
    assert f"evaluate: translate: {len(SENTENCES)}/{len(SENTENCES)} sentences" in r.stderr
    assert "evaluate: held-out loss over 5 pairs" in r.stderr
    assert "evaluate: latency over 2 sentences" in r.stderr
