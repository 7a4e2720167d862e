"""engine/recipe/translate.py and runners/translate.py: English in, Chinese out, from a
tiny random checkpoint made here (native and ChatGLM format)."""
import io
import os
import subprocess
import sys

import pytest

from engine.progress import Progress, format_duration
from engine.recipe.translate import Translator, read_sentences
from model.generate import GenerationConfig
from tiny_translation import SENTENCES, make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("translate"))


@pytest.fixture(scope="module")
def tr(ckpt):
    return Translator.load(ckpt, device="cpu")


def _hyps_as_ids(tr, sentences, gen):
    """What generate() itself returns for each sentence alone: the reference the batched,
    length-sorted translate() must reproduce."""
    from engine.recipe.evaluate import prompt_ids, translation_format
    from model.generate import generate
    from model.utf8_constraint import Utf8Constraint
    fmt = translation_format(tr.model, tr.tok)
    out = []
    for s in sentences:
        ids = generate(tr.model, [prompt_ids(tr.tok, s, 96, fmt)], gen.max_new_tokens,
                       fmt.stop_ids, tr.tok.pad_id, tr.tok.sop_id, mode="greedy",
                       vocab_size=tr.tok.vocab_size, utf8=Utf8Constraint.for_tokenizer(tr.tok))
        out.append(tr.tok.decode(ids[0]).strip())
    return out


def test_batched_greedy_equals_one_by_one_and_decodes_the_ids(tr):
    gen = GenerationConfig(max_new_tokens=12)
    batched = tr.translate(SENTENCES, gen, batch_size=4)
    single = [tr.translate([s], gen, batch_size=1)[0] for s in SENTENCES]
    assert batched == single
    assert batched == _hyps_as_ids(tr, SENTENCES, gen)
    assert all(isinstance(h, str) and "\ufffd" not in h for h in batched)
    assert len(set(batched)) > 1          # random weights still tell the inputs apart


def test_empty_lines_stay_in_place_and_modes_run(tr):
    gen = GenerationConfig(max_new_tokens=6)
    out = tr.translate(["Save changes?", "", "  ", "Permission denied"], gen)
    assert out[1] == out[2] == "" and len(out) == 4
    assert out[0] == tr.translate(["Save   changes?"], gen)[0]   # whitespace normalised
    beam = tr.translate(SENTENCES[:2], GenerationConfig("beam", 6, num_beams=3))
    s1 = tr.translate(SENTENCES[:3], GenerationConfig("sample", 6, top_k=5, top_p=0.9,
                                                      temperature=0.8, seed=1))
    s2 = tr.translate(SENTENCES[:3], GenerationConfig("sample", 6, top_k=5, top_p=0.9,
                                                      temperature=0.8, seed=1))
    assert len(beam) == 2 and s1 == s2


def test_interactive_loop(tr):
    lines, seen = iter(["Permission denied", "Save changes?", ""]), []
    tr.interactive(GenerationConfig(max_new_tokens=5), read=lambda _: next(lines),
                   write=seen.append)
    gen = GenerationConfig(max_new_tokens=5)
    assert seen == tr.translate(["Permission denied", "Save changes?"], gen)


def test_read_sentences(tmp_path):
    f = tmp_path / "en.txt"
    f.write_text("one\ntwo\n\nthree\n", encoding="utf-8")
    assert read_sentences([], str(f)) == ["one", "two", "", "three"]
    assert read_sentences(["a b"], None) == ["a b"]
    assert read_sentences([], "-", stdin=io.StringIO("x\ny\n")) == ["x", "y"]
    with pytest.raises(ValueError, match="not both"):
        read_sentences(["a"], str(f))
    with pytest.raises(ValueError, match="no such file"):
        read_sentences([], str(tmp_path / "missing.txt"))


def test_progress_line_has_elapsed_and_eta():
    t = iter([0.0, 30.0, 30.0, 60.0, 60.0])
    buf = io.StringIO()
    p = Progress(4, "translate", "sentences", out=buf, every_s=10, clock=lambda: next(t))
    p.update(1)                 # 30 s for 1 of 4: 90 s to go
    assert buf.getvalue().strip() == "translate: 1/4 sentences | 30s | ETA 1m30s"
    p.update(3)
    p.done()
    last = buf.getvalue().splitlines()[-1]
    assert last == "translate: 4/4 sentences | 1m00s | 0.1 sentences/s"
    assert format_duration(7325) == "2h02m" and format_duration(None) == "?"


def _run(args, stdin=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "runners/translate.py"] + args, cwd=ROOT, env=env,
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_runner_arguments_stdin_and_a_bad_checkpoint(ckpt, tr, tmp_path):
    gen = GenerationConfig(max_new_tokens=8)
    want = tr.translate(SENTENCES[:2], gen)
    r = _run(["--translate.checkpoint", ckpt, "--translate.max_new_tokens", "8",
              "--translate.threads", "1"] + SENTENCES[:2])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == want
    assert "loaded" in r.stderr and "translated 2 sentence(s)" in r.stderr
    r = _run(["--translate.checkpoint", os.path.dirname(ckpt) + "/ckpt",
              "--translate.max_new_tokens", "8", "--tsv"], stdin="\n".join(SENTENCES[:2]) + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{e}\t{z}" for e, z in zip(SENTENCES[:2], want)]
    r = _run(["--translate.checkpoint", str(tmp_path / "nope"), "hello"])
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'nope'} does "
                                             "not exist"]
    r = _run(["--translate.checkpoint", ckpt, "--translate.top_p", "0", "hello"])
    assert r.returncode == 1 and "top_p=0.0 must be in (0, 1]" in r.stderr


def test_a_chatglm_directory_translates_directly(tmp_path):
    from chatglm_ref import make_chatglm_dir, train_chatglm_sp
    sp = train_chatglm_sp(str(tmp_path / "sp"))
    src = make_chatglm_dir(str(tmp_path / "published"), "base", 1.0, tokenizer=sp)
    tr = Translator.load(src, device="cpu")
    assert "ChatGLM format" in tr.source and tr.model.config.causal
    out = tr.translate(SENTENCES[:3], GenerationConfig(max_new_tokens=5), batch_size=2)
    assert len(out) == 3 and all(isinstance(h, str) for h in out)
    os.remove(os.path.join(tmp_path / "published", "tokenizer.model"))
    with pytest.raises(ValueError, match="without tokenizer.model"):
        Translator.load(str(tmp_path / "published"), device="cpu")
