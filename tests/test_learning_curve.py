"""The learning-curve report (engine/recipe/reports/curve.py) and the side-by-side example
table (engine/recipe/reports/examples.py) on a tiny random checkpoint."""
import json
import os
import shutil

import pytest

from engine.recipe.reports import curve, examples
from tiny_translation import SENTENCES, make_checkpoint


def _run_dir(root, ckpt: str, steps=(2, 4)) -> str:
    run = root / "run"
    for s in steps:
        shutil.copytree(ckpt, run / "checkpoints" / f"step_{s:06d}")
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, max(steps) + 1):
            f.write(json.dumps({"step": s, "loss": 1.0, "tokens": 100 * s, "seconds": 0.5}) + "\n")
        f.write(json.dumps({"step": 4, "dev_loss": 1.0}) + "\n")   # an eval record: skipped
    return str(run)


def test_curve_scores_every_kept_checkpoint(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    run = _run_dir(tmp_path, ckpt)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{en}\t无法打开文件。\n" for en in SENTENCES), encoding="utf-8")
    cc = curve.CurveConfig(runs=[run], labels=["tiny"], offsets=[60.0], input=str(tsv), limit=3,
                           out=str(tmp_path / "out" / "curve"), max_new_tokens=6)
    rows = curve.run(cc, log=lambda *a: None)
    assert [r["step"] for r in rows] == [2, 4]
    # tokens and seconds accumulate over every step up to the checkpoint
    assert [r["tokens"] for r in rows] == [100 + 200, 100 + 200 + 300 + 400]
    assert [r["total_s"] for r in rows] == [60 + 1.0, 60 + 2.0]
    # the same weights at both steps: the same scores, so scoring is deterministic
    for key in ("bleu", "chrf", "exact_match", "loss"):
        assert rows[0][key] == rows[1][key]
    assert 0 <= rows[0]["chrf"] <= 100 and rows[0]["loss"] > 0
    md = (tmp_path / "out" / "curve.md").read_text()
    assert "Scored on 3 pairs" in md and md.count("| tiny |") == 2
    assert json.loads((tmp_path / "out" / "curve.json").read_text()) == rows
    cc.seconds_per_step = 10.0   # an idle machine's step time replaces the measured one
    assert [r["total_s"] for r in curve.measure(cc, log=lambda *a: None)] == [80.0, 100.0]


def test_curve_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2 entries for 1 runs"):
        curve.CurveConfig(runs=["a"], labels=["x", "y"], input="t.tsv")
    with pytest.raises(ValueError, match="required"):
        curve.CurveConfig(runs=["a"])
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    (tmp_path / "t.tsv").write_text("a\tb\n")
    with pytest.raises(ValueError, match="no kept checkpoints"):
        curve.measure(curve.CurveConfig(runs=[str(tmp_path / "empty")],
                                        input=str(tmp_path / "t.tsv")), log=lambda *a: None)


def test_subset_is_seeded_and_keeps_file_order():
    items = list(range(100))
    a, b = curve.subset(items, 10, seed=1), curve.subset(items, 10, seed=1)
    assert a == b == sorted(a) and len(set(a)) == 10
    assert curve.subset(items, 10, seed=2) != a
    assert curve.subset(items, 0, seed=1) == items


def test_examples_table_lines_up_two_models(tmp_path):
    rows = [(f"en {i}", f"ref {i}") for i in range(20)]
    for name, tag in (("t.tsv", "T"), ("s.tsv", "S")):
        (tmp_path / name).write_text("".join(f"{e}\t{r}\t{tag} {e}|x\n" for e, r in rows),
                                     encoding="utf-8")
    text = examples.table({"teacher": str(tmp_path / "t.tsv"),
                           "student": str(tmp_path / "s.tsv")}, n=5, seed=0)
    lines = text.splitlines()
    assert lines[0] == "| English | reference | teacher | student |" and len(lines) == 7
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        i = cells[0].split()[1]
        assert cells == [f"en {i}", f"ref {i}", f"T en {i}\\|x", f"S en {i}\\|x"]
    (tmp_path / "s.tsv").write_text("other\tpair\thyp\n", encoding="utf-8")
    with pytest.raises(ValueError, match="same pairs"):
        examples.table({"teacher": str(tmp_path / "t.tsv"), "student": str(tmp_path / "s.tsv")})
