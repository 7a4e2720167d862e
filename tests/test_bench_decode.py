"""runners/bench_decode.py (engine/recipe/decode_bench.py): every model decodes exactly the requested tokens (no early
stop), the models are timed in turns, and ratios are to the first model."""
import os
import subprocess
import sys

import torch

from model import GLM, GLMConfig

from engine.recipe import decode_bench as bench_decode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(layers: int) -> GLM:
    return GLM.build(GLMConfig.preset("tiny", num_layers=layers, padded_vocab_size=256)).eval()


def test_fixed_length_decoding_and_ratios():
    models = {"teacher": _model(4), "student": _model(2)}
    # pad 0, sop 1; [gMASK]-style prompt ends are not needed by generate itself
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    with torch.no_grad():
        times = bench_decode.bench(models, prompts, new_tokens=5, rounds=3, pad_id=0, sop_id=1)
    assert set(times) == {"teacher", "student"} and all(len(t) == 3 for t in times.values())
    assert all(t > 0 for ts in times.values() for t in ts)
    text = bench_decode.table(models, times)
    rows = [ln for ln in text.splitlines() if ln.startswith("| teacher") or ln.startswith("| student")]
    assert rows[0].endswith("| 1.00x |")                     # ratios are to the first model
    ratio = float(rows[1].split("|")[-2].strip().rstrip("x"))
    assert abs(ratio - sorted(times["student"])[1] / sorted(times["teacher"])[1]) < 0.01


def test_a_model_that_would_stop_still_decodes_every_token():
    """Even when the end id is the likeliest token, decoding runs all the steps."""
    m = _model(2)
    with torch.no_grad():
        m.output_layer.weight.zero_()
        m.output_layer.weight[-1].fill_(1.0)       # every logit favours the end id
        ms = bench_decode.decode_ms_per_token(m, [[5, 6, 7]], 6, pad_id=0, sop_id=1)
    assert ms > 0


def test_bad_input_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "runners/bench_decode.py", str(tmp_path / "none"),
                        "--data.dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and p.stderr.strip().startswith("error:")
    assert len(p.stderr.strip().splitlines()) == 1
