"""Smoke test of the paper report (runners/report.py --report.quick true): every markdown table is
written with numbers from the runs; plots when matplotlib is there, and the markdown
alone (saying so) when it is not."""
import builtins
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ("--report.quick", "true")
MARKDOWN = ["figure3_schedules.md", "figure4_compression_vs_random.md",
            "figure5_finetuning.md", "table4_compression.md", "table5_ablation.md"]
PLOTS = ["figure3_schedules.png", "figure4_validation_loss.png", "figure5_strategies.png",
         "table4_latency.png"]


def _run(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, f"{args[0]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    data = os.path.join(ROOT, "data")
    if not os.path.isfile(os.path.join(data, "manifest.json")):   # a fresh clone
        data = str(tmp / "data")
        _run("runners/prepare_data.py", "--data.dir", data, "--data.vocab_size", "2000")
    # the base starts from a pretrained LM, as in `make paper` (here: 2 steps of tiny)
    lm = tmp / "lm"
    _run("runners/pretrain.py", "--model.preset", "tiny", "--model.padded_vocab_size", "8192",
         "--data.dir", data, "--train.steps", "2", "--train.micro_batch_size", "2",
         "--train.seq_len", "32", "--train.eval_every", "0", "--train.out_dir", str(lm))
    out = tmp / "reports"
    p = _run("runners/report.py", *QUICK, "--report.out_dir", str(out), "--report.work_dir",
             str(tmp / "work"), "--data.dir", data, "--report.pretrained",
             str(lm / "checkpoint"), "--report.seeds", "2")
    return SimpleNamespace(out=out, stdout=p.stdout, lm=str(lm / "checkpoint"), data=data,
                           work=str(tmp / "work"))


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _numeric_rows(text):
    return [ln for ln in text.splitlines() if ln.startswith("| ") and
            re.search(r"\| -?\d[\d,]*\.?\d* ", ln) and not ln.startswith("|---")]


def test_quick_report_writes_tables(quick_report):
    out, stdout, lm = quick_report.out, quick_report.stdout, quick_report.lm
    for name in MARKDOWN:
        text = (out / name).read_text(encoding="utf-8")
        assert len(_numeric_rows(text)) >= 2, name
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    t5 = (out / "table5_ablation.md").read_text(encoding="utf-8")
    assert len(_numeric_rows(t5)) == 8                      # every ablation combination
    # the tables carry the measured numbers: the baseline's BLEU and dev loss
    base_q, base_run = res["quality"]["ft_source"], res["runs"]["ft_source"]
    row = next(ln for ln in t5.splitlines() if ln.startswith("| baseline"))
    assert f"{base_q['bleu']:.2f}" in row and f"{base_run['dev_loss_target']:.3f}" in row
    # compression really shrank the student; the strategies trained with their alphas
    assert res["quality"]["st_mixed_0.5"]["params"] < res["quality"]["ft_mixed"]["params"]
    assert [res["runs"][f"ft_{s}"]["alpha"] for s in ("source", "target", "mixed")] == \
        [1.0, 0.0, 0.65]
    assert res["config"]["pretrained"] == lm and f"pretrained LM {lm}" in t5
    assert set(res["figure3"]["epoch_seconds"]) == {
        "no pipeline", "GPipe (pp=2)", "1F1B (pp=2)", "interleaved 1F1B (pp=2, vpp=2)"}
    if _has_matplotlib():
        for name in PLOTS:
            assert (out / name).stat().st_size > 1000, name
        assert "plots skipped" not in stdout
    else:
        assert "plots skipped" in (out / "table4_compression.md").read_text(encoding="utf-8")


def test_markdown_without_matplotlib(quick_report, tmp_path, monkeypatch):
    """Whatever this environment has installed: with matplotlib unimportable the same
    results still give every table, and the markdown says the plots were skipped."""
    from engine.recipe.reports.write import write_reports
    out = quick_report.out
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    written = write_reports(res, str(tmp_path))
    assert written["plots"] == [] and "matplotlib" in written["plots_skipped"]
    assert sorted(written["markdown"]) == MARKDOWN
    for name in MARKDOWN:
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert "plots skipped" in text and ".png" not in text
        assert _numeric_rows(text)


def test_pretrained_checkpoint_is_checked_before_training(quick_report, tmp_path):
    """A missing checkpoint or one of another shape is a one-line error up front."""
    from engine.recipe.reports.budget import ReportConfig
    from engine.recipe.reports.recipe import Recipe
    lm, data = quick_report.lm, quick_report.data
    with pytest.raises(ValueError, match="report.pretrained.*num_layers"):
        Recipe(ReportConfig(preset="small", pretrained=lm,
                            work_dir=str(tmp_path / "w")))._checked("pretrained")
    assert Recipe(ReportConfig.quick(pretrained=lm,
                                     work_dir=str(tmp_path / "w")))._checked("pretrained") == lm
    with pytest.raises(ValueError, match="report.base.*num_layers"):
        Recipe(ReportConfig.on_teacher(lm, work_dir=str(tmp_path / "w")))._checked("base")
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "runners/report.py", *QUICK, "--report.pretrained",
                        str(tmp_path / "nope"), "--report.work_dir", str(tmp_path / "w2"),
                        "--data.dir", data,
                        "--report.out_dir", str(tmp_path / "r")], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode != 0 and p.stderr.strip().startswith("error: report.pretrained")
    assert len(p.stderr.strip().splitlines()) == 1


def test_report_on_a_given_teacher_trains_no_base(quick_report, tmp_path):
    """make paper's form: report.base names a trained checkpoint (make demo's teacher);
    no base stage runs, every fine-tuning starts from it and it is evaluated as "base".
    On the CLI the quick size refuses it in one line (the tiny preset is from scratch)."""
    from engine.recipe.reports.budget import ReportConfig
    from engine.recipe.reports.recipe import Recipe
    q = quick_report
    base = os.path.join(q.work, "base", "checkpoint")
    lines = []
    rc = ReportConfig.quick(base=base, work_dir=str(tmp_path / "w"), data_dir=q.data,
                            out_dir=str(tmp_path / "r"), seeds=1, threads=2)
    res = Recipe(rc, log=lines.append).run()
    assert not any(ln.startswith("  base:") for ln in lines), lines
    assert not os.path.exists(tmp_path / "w" / "base") and "base" not in res["runs"]
    assert res["quality"]["base"]["bleu"] >= 0 and f"base {base}" in lines[0]
    meta = json.loads(open(os.path.join(tmp_path, "w", "ft_mixed", "checkpoint", "meta.json"),
                           encoding="utf-8").read())
    assert json.dumps(meta).count(base) >= 1          # the fine-tuning started from it
    t = ReportConfig.on_teacher(base)
    assert (t.finetune_lr, t.distill_lr, t.distill_steps) == (4e-4, 2e-3, 100)
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "runners/report.py", *QUICK, "--report.base", base],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0 and p.stderr.strip() == (
        "error: report.base needs the full size: report.quick is the tiny preset from scratch")


def test_resume_reuses_finished_stages_and_refuses_other_settings(quick_report, tmp_path):
    """--resume on the same work dir trains nothing again and gives the same training
    records; with other settings it refuses in one line instead of mixing runs."""
    q = quick_report
    args = ("runners/report.py", *QUICK, "--report.work_dir", q.work, "--data.dir", q.data,
            "--report.pretrained", q.lm, "--resume", "--report.seeds", "2")
    p = _run(*args, "--report.out_dir", str(tmp_path / "r"))
    # a stage that ran logs "  <name>: <seconds> s"; a reused one "  <name>: reused from"
    ran = [ln for ln in p.stdout.splitlines()
           if re.fullmatch(r"  (base|ft_|pruned_|st_)\S*: [\d.]+ s", ln)]
    assert ran == [], ran
    assert "base: reused" in p.stdout and "st_random_0.5: reused" in p.stdout
    assert "ft_mixed@seed1235: reused" in p.stdout
    first = json.loads((q.out / "results.json").read_text(encoding="utf-8"))
    again = json.loads((tmp_path / "r" / "results.json").read_text(encoding="utf-8"))
    assert again["runs"] == first["runs"]
    assert "resumed: " in (tmp_path / "r" / "table5_ablation.md").read_text(encoding="utf-8")
    assert "resumed" not in (q.out / "table5_ablation.md").read_text(encoding="utf-8")
    # latency per generated token is measured for every evaluated checkpoint
    assert all(v["latency_ms_per_token"] > 0 for v in again["quality"].values())
    env = {**os.environ, "PYTHONPATH": ROOT}
    bad = subprocess.run([sys.executable, *args, "--report.scale", "2", "--report.out_dir",
                          str(tmp_path / "b")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "other settings (base_steps" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_claims_run_per_seed_with_mean_and_spread(quick_report, tmp_path):
    """The comparisons behind the paper's claims run once per seed (the base shared);
    their tables give mean (min..max) and say whether a row's range clears the
    reference's; --resume with another seed count keeps the finished seeds."""
    from engine.recipe.reports import seeds
    from engine.recipe.reports.budget import ReportConfig
    from engine.recipe.reports.recipe import Recipe
    q = quick_report
    res = json.loads((q.out / "results.json").read_text(encoding="utf-8"))
    runs, quality = res["runs"], res["quality"]
    assert res["config"]["seeds"] == 2
    s1 = res["config"]["seed"] + 1
    claims = ["ft_source", "ft_target", "ft_mixed", "st_mixed_0.5", "st_random_0.5"]
    for name in claims:
        again = f"{name}@seed{s1}"
        assert again in runs and again in quality, again
        # another seed is another data order: the same stage ends elsewhere
        assert runs[again]["dev_loss_target"] != runs[name]["dev_loss_target"], name
    assert not any("@seed" in n for n in runs if n.startswith(("base", "ft_source_pp")))
    assert os.path.isdir(os.path.join(q.work, f"seed{s1}", "ft_mixed", "checkpoint"))
    # every claim's table carries its seed rows: mean (min..max) from results.json
    f4 = (q.out / "figure4_compression_vs_random.md").read_text(encoding="utf-8")
    assert "## Over 2 seeds" in f4
    row = next(ln for ln in f4.splitlines() if ln.startswith("| random pruning + KD"))
    v = [runs["st_random_0.5"]["dev_loss_target"], runs[f"st_random_0.5@seed{s1}"]
         ["dev_loss_target"]]
    assert f"{sum(v) / 2:.3f} ({min(v):.3f}..{max(v):.3f})" in row
    verdict = "yes" if seeds.beyond_spread(
        v, [runs["st_mixed_0.5"]["dev_loss_target"],
            runs[f"st_mixed_0.5@seed{s1}"]["dev_loss_target"]]) else "no"
    assert f"dev loss D_d: {verdict}" in row
    f5 = (q.out / "figure5_finetuning.md").read_text(encoding="utf-8")
    assert sum(ln.startswith(("| source-only", "| target-only")) and "BLEU zh→en: " in ln
               for ln in f5.splitlines()) == 2
    t4 = (q.out / "table4_compression.md").read_text(encoding="utf-8")
    assert "| teacher (hybrid fine-tuned) |" in t4 and "reference |" in t4
    # the verdict: disjoint min..max ranges only
    assert seeds.beyond_spread([1.0, 1.1], [1.2, 1.3]) is True
    assert seeds.beyond_spread([1.0, 1.25], [1.2, 1.3]) is False
    assert seeds.beyond_spread([1.0], [2.0]) is None
    # seeds are not a setting --resume refuses: each seed's stages stand alone
    rc = ReportConfig.quick(out_dir=str(tmp_path / "r"), work_dir=q.work, data_dir=q.data,
                            threads=2, pretrained=q.lm, seeds=3)
    Recipe(rc, resume=True)._check_resume()
    with pytest.raises(ValueError, match="report.seeds"):
        ReportConfig.quick(seeds=0)
