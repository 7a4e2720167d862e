"""Every file in runners/ speaks the one command line (engine/config_cli.py, issue 18):
--help lists every field of its sections with its default and a line of help,
--print-config prints the resolved config as JSON and runs nothing, the old dash flags
still work and warn, lists are comma-separated (or JSON), and the Makefile, README and
docs use the new spellings only.

Each runner file is loaded in this process (not a subprocess: a fresh interpreter costs
~2 s of torch import per runner) under a name that is not __main__, so its
`if __name__ == "__main__"` block does not run and its main is called directly."""
import contextlib
import dataclasses
import functools
import glob
import io
import json
import os
import importlib.util
import re
import sys
import time

import pytest

from engine.config_cli import Command, command, field_help

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNERS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "runners",
                                                                          "*.py")))
# the least each runner needs for its config to resolve (required fields)
REQUIRED = {
    "translate": ["--translate.checkpoint", "c"],
    "evaluate": ["--eval.checkpoint", "c", "--eval.input", "i"],
    "prune": ["--prune.teacher", "t", "--prune.out_dir", "o", "--prune.keep", "0.5"],
    "distill": ["--distill.teacher", "t", "--distill.student", "s"],
    "convert_checkpoint": ["--convert.direction", "to_chatglm", "--convert.checkpoint", "a",
                           "--convert.out_dir", "b"],
    "bench_decode": ["ck"],
    "learning_curve": ["--curve.runs", "r", "--curve.input", "i"],
}


@functools.cache
def _namespace(name: str) -> dict:
    env = os.environ.get("TRITON_INTERPRET")
    spec = importlib.util.spec_from_file_location(f"runner_{name}",
                                                  os.path.join(ROOT, "runners", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # --help reads its dataclasses' source
    try:
        spec.loader.exec_module(module)
    finally:     # check_kernels drops the interpreter switch for its own process only
        if env is not None:
            os.environ["TRITON_INTERPRET"] = env
    return vars(module)


def _command(name: str) -> Command:
    ns = _namespace(name)
    if "COMMAND" in ns:
        return ns["COMMAND"]
    return sys.modules[ns["main"].__module__].COMMAND


def _call(name: str, argv: list[str]):
    """(exit code, stdout, stderr) of the runner's main(argv), in process."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            got = _namespace(name)["main"](argv)
            code = got if isinstance(got, int) else 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_every_runner_is_listed_here():
    assert "stage" not in RUNNERS          # Makefile plumbing: engine/progress_stage.py
    assert len(RUNNERS) >= 18, RUNNERS


@pytest.mark.parametrize("name", RUNNERS)
def test_help_lists_every_field_with_its_default_and_help(name):
    code, out, _ = _call(name, ["--help"])
    assert code == 0
    text = " ".join(out.split())            # argparse wraps lines
    cmd = _command(name)
    assert "--config FILE" in text and "--print-config" in text
    for flag in cmd.flags:
        assert flag in text
    for section, cls in cmd.sections.items():
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            assert helps.get(f.name), f"{name}: {section}.{f.name} has no help line"
            assert f"--{section}.{f.name} " in text, f"{name}: --{section}.{f.name} not listed"
            default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else f.default)
            assert f"(default: {json.dumps(default)})" in text, f"{name}: {section}.{f.name}"
    for old in cmd.aliases:                  # the deprecated spellings are listed too
        assert f"{old} = " in text


@pytest.mark.parametrize("name", RUNNERS)
def test_print_config_prints_json_and_does_nothing(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)             # a runner that ran would leave files here
    t0 = time.perf_counter()
    code, out, err = _call(name, REQUIRED.get(name, []) + ["--print-config"])
    assert code == 0, err
    got = json.loads(out)                   # the whole of stdout is the config
    assert set(got) == set(_command(name).sections)
    assert os.listdir(tmp_path) == []
    assert time.perf_counter() - t0 < 10


def _parse(name, argv, capsys):
    config, _ = _command(name).parse(argv)
    return config.to_dict(), capsys.readouterr().err


# (runner, old spelling, the same in the new one)
ALIASES = [
    ("translate", ["--checkpoint", "c", "--batch-size", "4", "--top-p", "0.9", "hi"],
     ["--translate.checkpoint", "c", "--translate.micro_batch_size", "4",
      "--translate.top_p", "0.9", "hi"]),
    ("plan", ["--model", "glm4-9b", "--gpus", "16", "--gpu-mem", "40", "--zero-stages", "0,1",
              "--no-sequence-parallel", "--global-batch", "32"],
     ["--model.preset", "glm4-9b", "--plan.gpus", "16", "--plan.memory_gb", "40",
      "--plan.zero_stages", "0,1", "--plan.sequence_parallel", "false",
      "--plan.global_batch_size", "32"]),
    ("prepare_data", ["--out", "d", "--test-catalogs", "wget,tar", "--vocab-size", "2000"],
     ["--data.dir", "d", "--data.test_catalogs", "wget,tar", "--data.vocab_size", "2000"]),
    ("report", ["--quick", "--data-dir", "d", "--work-dir", "w", "--threads", "1"],
     ["--report.quick", "true", "--data.dir", "d", "--report.work_dir", "w",
      "--report.threads", "1"]),
    ("convert_checkpoint", ["--from-chatglm", "a", "b", "--chat-format", "none"],
     ["--convert.direction", "from_chatglm", "--convert.checkpoint", "a",
      "--convert.out_dir", "b", "--convert.chat_format", "none"]),
    ("validate_planner", ["--only", "single,dp2-z1", "--layers", "2", "--global-batch", "8"],
     ["--validate.layouts", "single,dp2-z1", "--model.num_layers", "2",
      "--validate.global_batch_size", "8"]),
    ("check_kernels", ["--arch", "80", "90", "--models", "glm4-9b", "--out", "t.md"],
     ["--check.archs", "80,90", "--check.models", "glm4-9b", "--check.out_file", "t.md"]),
    ("gpu_check", ["--sections", "kernels", "timings", "--train-steps", "5"],
     ["--gpu_check.sections", "kernels,timings", "--gpu_check.train_steps", "5"]),
    ("bench_decode", ["a", "b", "--names", "t", "s", "--data-dir", "d"],
     ["--bench.checkpoints", "a,b", "--bench.names", "t,s", "--data.dir", "d"]),
    ("bench_optimizer", ["--presets", "tiny", "--zero-stages", "0", "1", "--batch", "3"],
     ["--bench.presets", "tiny", "--bench.zero_stages", "[0, 1]",
      "--bench.micro_batch_size", "3"]),
    ("bench_train", ["--preset", "tiny", "--batch", "4", "--device", "cpu"],
     ["--model.preset", "tiny", "--bench.micro_batch_size", "4", "--bench.device", "cpu"]),
    ("bench_kernels", ["--no-compile", "--seqs", "128", "256", "--batch", "2"],
     ["--bench.compile", "false", "--bench.seq_lens", "128,256",
      "--bench.micro_batch_size", "2"]),
    ("bench_pipeline", ["--timeout", "30", "--schedules", "1f1b,gpipe", "--layers", "4"],
     ["--bench.timeout_s", "30", "--bench.schedules", "1f1b,gpipe", "--model.num_layers",
      "4"]),
]


@pytest.mark.parametrize("name, old, new", ALIASES, ids=[a[0] for a in ALIASES])
def test_old_flags_give_the_same_config_and_warn_once_each(name, old, new, capsys):
    got_old, err_old = _parse(name, old, capsys)
    got_new, err_new = _parse(name, new, capsys)
    assert got_old == got_new
    flags = [a for a in old if a.startswith("--")]
    warnings = err_old.strip().splitlines()
    assert len(warnings) == len(flags) and err_new == ""
    for flag, line in zip(flags, warnings):
        assert line.startswith(f"warning: {flag} is deprecated; use --"), line


def test_an_old_switch_maps_to_a_new_flag(capsys):
    config, flags = _command("convert_checkpoint").parse(
        REQUIRED["convert_checkpoint"] + ["--overwrite"])
    assert flags.force is True
    assert "warning: --overwrite is deprecated; use --force" in capsys.readouterr().err


def test_bare_words_and_the_double_dash(capsys):
    cfg = _parse("translate", ["--translate.checkpoint", "c", "one", "--translate.top_k",
                               "3", "two", "--", "--three"], capsys)[0]["translate"]
    assert cfg["sentences"] == ["one", "two", "--three"] and cfg["top_k"] == 3
    with pytest.raises(ValueError, match="unrecognised argument 'stray'"):
        _command("plan").parse(["stray"])


@dataclasses.dataclass
class _Lists:
    nums: list[int] = dataclasses.field(default_factory=list)   # numbers
    words: list[str] = dataclasses.field(default_factory=list)  # words


@pytest.mark.parametrize("text, want", [("80,90", [80, 90]), ("[80, 90]", [80, 90]),
                                        ("80", [80]), ("", [])])
def test_lists_are_comma_separated_or_json_on_the_command_line(text, want, tmp_path):
    cmd = command("lists", {"c": _Lists})
    assert cmd.parse(["--c.nums", text])[0].c.nums == want
    assert cmd.parse(["--c.words", "wget, tar,2024"])[0].c.words == ["wget", "tar", "2024"]
    with pytest.raises(ValueError, match=r"c.nums\[1\]='x' must be an integer"):
        cmd.parse(["--c.nums", "1,x"])
    # a config file writes a JSON list; a bare number there is still refused
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"c": {"nums": [1, 2]}}))
    assert cmd.parse(["--config", str(f)])[0].c.nums == [1, 2]
    f.write_text(json.dumps({"c": {"nums": 3}}))
    with pytest.raises(ValueError, match="c.nums=3 must be a list"):
        cmd.parse(["--config", str(f)])


def _commands_in(path: str):
    """(runner, [--options]) of every `runners/NAME.py ...` command in a file, joining
    backslash-continued lines."""
    text = open(path, encoding="utf-8").read().replace("\\\n", " ")
    for line in text.splitlines():
        for m in re.finditer(r"runners/(\w+)\.py((?:\s+[^`|;#]\S*)*)", line):
            yield m.group(1), re.findall(r"(?<!\S)--[\w.-]+", m.group(2))


@pytest.mark.parametrize("doc", ["Makefile", "README.md", *sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))])
def test_makefile_readme_and_docs_use_the_new_spellings(doc):
    found = 0
    for name, options in _commands_in(os.path.join(ROOT, doc)):
        if name not in RUNNERS:
            continue
        cmd = _command(name)
        for opt in options:
            found += 1
            assert opt not in cmd.aliases, f"{doc}: runners/{name}.py {opt} is deprecated"
            assert (opt in ("--config", "--print-config", "--help", "--debug", "--parallel")
                    or opt in cmd.flags or opt.split(".")[0][2:] in cmd.sections), \
                f"{doc}: runners/{name}.py {opt} is not an option of it"
    assert doc != "Makefile" or found > 20
