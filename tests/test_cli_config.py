"""One command-line style for the workflow runners (engine/config_cli.py, issue 18):
--help generated from the dataclasses (every field, its default, a line of help),
--print-config resolves and exits, old dash flags map to fields with one warning each."""
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys

import pytest

from engine.config_cli import field_help
from engine.recipe.workflows import distill, evaluate, finetune, prune, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = {"pretrain": pretrain, "distill": distill, "finetune": finetune,
             "prune": prune, "evaluate": evaluate}


def _help(module) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        module.COMMAND.parse(["--help"])
    assert e.value.code == 0
    return buf.getvalue()


@pytest.mark.parametrize("name", WORKFLOWS)
def test_help_lists_every_field_with_default_and_help(name):
    module = WORKFLOWS[name]
    text = " ".join(_help(module).split())      # argparse wraps lines
    for section, cls in module.COMMAND.sections.items():
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            assert helps.get(f.name), f"{section}.{f.name} has no help line"
            assert f"--{section}.{f.name} " in text, f"--{section}.{f.name} not listed"
            default = f.default if f.default is not dataclasses.MISSING else None
            assert f"(default: {json.dumps(default)})" in text


def test_help_of_a_runner_file_runs_without_sys_path_edits():
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "runners/distill.py", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "--distill.teacher_layout" in p.stdout and "--train.steps" in p.stdout


def test_print_config_resolves_file_overrides_and_aliases(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"prune": {"keep": 0.4, "seed": 3}}))
    config, _ = prune.COMMAND.parse(["--config", str(cfg), "--print-config",
                                     "--prune.teacher", "t", "--out", "o", "--seed", "5",
                                     "--paper-rule"])
    out, err = capsys.readouterr()
    assert config is None
    got = json.loads(out)
    assert got["prune"]["keep"] == 0.4 and got["prune"]["seed"] == 5     # override wins
    assert got["prune"]["out_dir"] == "o" and got["prune"]["paper_rule"] is True
    assert err.splitlines() == [
        "warning: --out is deprecated; use --prune.out_dir",
        "warning: --seed is deprecated; use --prune.seed",
        "warning: --paper-rule is deprecated; use --prune.paper_rule true"]


def test_old_positional_stage_and_new_field_give_the_same_config(capsys):
    old, _ = finetune.COMMAND.parse(["student", "--student", "s", "--teacher", "t"])
    new, _ = finetune.COMMAND.parse(["--finetune.stage", "student", "--finetune.student", "s",
                                     "--finetune.teacher", "t"])
    assert old.to_dict() == new.to_dict() and new.job.stage == "student"
    assert "positional 'student' is deprecated" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--eval.checkpoint", "c"], "eval.input are required"),
    (["--eval.checkpoint", "c", "--eval.input", "i", "--train.steps", "3"],
     "unknown config section(s) train"),
    (["--eval.checkpoint", "c", "--eval.input", "i", "--eval.limt", "3"],
     "unknown eval field(s): limt"),
    (["--eval.checkpoint", "c", "--eval.input", "i", "--eval.limit", "x"],
     "eval.limit='x' must be an integer"),
])
def test_bad_command_lines_are_one_line_value_errors(argv, needle):
    with pytest.raises(ValueError, match=None) as e:
        evaluate.COMMAND.parse(argv)
    assert needle in str(e.value)


def test_distill_refuses_a_model_section():
    with pytest.raises(ValueError, match="student's shape"):
        distill.COMMAND.parse(["--distill.student", "s", "--model.num_layers", "2"])


def test_runners_are_entry_points_only():
    """No runner edits sys.path (the package is installed editable) and nothing in the
    library or the tests imports a runner: the workflows live in engine/."""
    import glob
    import re
    for path in glob.glob(os.path.join(ROOT, "runners", "*.py")):
        assert "sys.path" not in open(path, encoding="utf-8").read(), path
    pattern = re.compile(r"^\s*(from runners\b|import runners\b|.*spec_from_file_location"
                         r"|.*runpy\.run_path)", re.M)
    for path in glob.glob(os.path.join(ROOT, "engine", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "tests", "*.py")):
        if path.endswith(("test_cli_config.py", "test_runner_cli.py")):   # runners' own tests
            continue
        assert not pattern.search(open(path, encoding="utf-8").read()), path
