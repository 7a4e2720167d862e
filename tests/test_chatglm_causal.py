"""Imported ChatGLM2/3 / GLM-4 checkpoints behave as their reference code: causal 1D
decoding (greedy, beam, KV cache, left padding) and forward parity per rope variant
against tests/chatglm_ref.py (written from the published semantics), the ChatGLM
sentencepiece tokenizer, its chat prompt, and import -> fine-tune -> export -> import."""
import json
import os

import pytest
import torch

from chatglm_ref import ChatGLMReference, make_chatglm_dir, train_chatglm_sp
from engine.train import checkpoint as ckpt_lib
from engine.config import build_run_config
from engine.recipe.data.datasets import TranslationDataset
from engine.recipe.data.prompts import TranslationFormat
from engine.train.trainer import Trainer
from model import GLMConfig
from model.chatglm_tokenizer import SPECIAL_TOKENS, ChatGLMTokenizer
from model.convert import config_from_chatglm, load_chatglm, rope_scaling_from_code
from model.generate import generate, prefill, prepare_prompts
from model.masks import IGNORE
from model.tokenizer import Tokenizer, load_tokenizer

# (scaling, rope_ratio): GLM-4 style base scaling, chatglm2-6b-32k position
# interpolation, chatglm3-6b ignoring the key. Ratios large enough to move the logits.
VARIANTS = [("base", 50.0), ("position", 4.0), ("none", 50.0)]
PROMPTS = [[7, 12, 30, 5, 99, 41], [3, 250, 17], [60, 61, 62, 63, 64, 65, 66, 67, 68]]


def _imported(tmp_path, scaling, ratio):
    d = make_chatglm_dir(str(tmp_path / f"glm-{scaling}"), scaling, ratio)
    return load_chatglm(d, kernels="torch"), ChatGLMReference(d, scaling)


@pytest.mark.parametrize("scaling, ratio", VARIANTS)
def test_forward_matches_reference_per_rope_variant(tmp_path, scaling, ratio):
    model, ref = _imported(tmp_path, scaling, ratio)
    c = model.config
    assert (c.position_layout, c.rope_scaling, c.rope_ratio) == ("causal1d", scaling, ratio)
    ids = list(range(5, 45))
    want = ref.logits(ids)
    got = model(torch.tensor([ids]))[0]
    assert (got - want).abs().max() < 2e-5
    # the layout is the weights': a GLM-style batch (bidirectional prefix, block ids)
    # computes the same causal 1D logits
    glm_style = model(torch.tensor([ids]), prefix_lens=torch.tensor([20]),
                      block_position_ids=torch.arange(40).view(1, -1))[0]
    assert torch.equal(glm_style, got)


def test_rope_variants_differ(tmp_path):
    """The three readings of one rope_ratio give different models: the test above could
    not pass with the wrong one."""
    ids = list(range(5, 45))
    outs = [_imported(tmp_path, s, 4.0)[1].logits(ids) for s in ("base", "position", "none")]
    for a in range(3):
        for b in range(a + 1, 3):
            assert (outs[a] - outs[b]).abs().max() > 1e-2


@pytest.mark.parametrize("scaling, ratio", VARIANTS)
def test_generate_matches_reference_greedy_and_beam(tmp_path, scaling, ratio):
    model, ref = _imported(tmp_path, scaling, ratio)
    eos = 2
    # batched, left-padded, through the KV cache
    got = generate(model, PROMPTS, max_new_tokens=12, eos_id=eos, pad_id=0, sop_id=0)
    want = [ref.greedy(p, 12, {eos}) for p in PROMPTS]
    assert got == want
    # every prefill / decode step's logits against a full recompute of the sequence
    batch = prepare_prompts(PROMPTS, 0, 0, causal=True)
    cache = model.new_kv_cache(batch.rows, batch.width)
    last = prefill(model, batch, cache)
    for r, p in enumerate(PROMPTS):
        assert (last[r] - ref.logits(p)[-1]).abs().max() < 2e-5
    got_beam = generate(model, PROMPTS[:2], max_new_tokens=5, eos_id=eos, pad_id=0, sop_id=0,
                        mode="beam", num_beams=3)
    assert got_beam == [ref.beam(p, 5, 3, eos) for p in PROMPTS[:2]]


def test_eos_set_stops_decoding(tmp_path):
    model, ref = _imported(tmp_path, "base", 1.0)
    free = ref.greedy(PROMPTS[0], 6, set())
    got = generate(model, [PROMPTS[0]], max_new_tokens=6, eos_id=[2, free[2]], pad_id=0,
                   sop_id=0)
    assert got == [free[:2]]


def test_native_layout_unchanged(tmp_path):
    """A native checkpoint keeps the GLM 2D layout: an old meta.json without the fields
    loads as glm2d, and the GLM prompt still decodes with a bidirectional Part A."""
    cfg = GLMConfig.preset("tiny")
    d = cfg.to_dict()
    for f in ("position_layout", "rope_scaling", "chat_format"):
        d.pop(f)
    old = GLMConfig.from_dict(d)
    assert (old.position_layout, old.rope_scaling, old.chat_format) == ("glm2d", "base", "")
    with pytest.raises(ValueError, match="position_layout='x'"):
        GLMConfig(position_layout="x")
    with pytest.raises(ValueError, match="rope_scaling='linear'"):
        GLMConfig(rope_scaling="linear")
    with pytest.raises(ValueError, match="needs position_layout='causal1d'"):
        GLMConfig(chat_format="chatglm3")
    b = prepare_prompts([[5, 6, 7, 4]], pad_id=0, sop_id=3)
    assert not b.causal and b.prefix_lens.tolist() == [4] and b.block_position_ids[0, -1] == 1


def test_rope_scaling_detection_and_export_round_trip(tmp_path):
    assert rope_scaling_from_code("x = arange(n) / self.rope_ratio") == "position"
    assert rope_scaling_from_code("base = base * self.rope_ratio") == "base"
    assert rope_scaling_from_code("def forward(self): pass") == "none"
    d = make_chatglm_dir(str(tmp_path / "pos"), "position", 16.0)
    model = load_chatglm(d)
    assert model.config.rope_scaling == "position"
    from model.convert import export_chatglm
    export_chatglm(model, str(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rope_ratio"] == 16.0 and written["glm_rope_scaling"] == "position"
    assert config_from_chatglm(written) == model.config
    # no modeling code: the published name decides, and an override wins
    base = {k: v for k, v in json.loads((tmp_path / "pos" / "config.json").read_text()).items()}
    assert config_from_chatglm({**base, "_name_or_path": "THUDM/chatglm2-6b-32k"}
                               ).rope_scaling == "position"
    assert config_from_chatglm({**base, "_name_or_path": "THUDM/glm-4-9b-chat"}
                               ).rope_scaling == "base"
    assert config_from_chatglm(base, rope_scaling="none").rope_scaling == "none"


# ---- tokenizer ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_chatglm_sp(str(tmp_path_factory.mktemp("sp")))


def test_tokenizer_special_ids_and_round_trip(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, ChatGLMTokenizer)
    n = tok.sp.get_piece_size()
    # the reference appends the specials after the sentencepiece pieces, in this order
    assert [tok.command(t) for t in SPECIAL_TOKENS] == list(range(n, n + 9))
    assert (tok.gmask_id, tok.sop_id, tok.eop_id) == (n + 1, n + 3, n + 4)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == n + 9
    assert [tok.id_to_piece(i) for i in range(n, n + 9)] == list(SPECIAL_TOKENS)
    texts = ["The file could not be opened.", "无法打开文件。", "mixed 中文 and English",
             "rare 龘 character", "  two  spaces\nand a newline"]
    for t in texts:
        ids = tok.encode(t)
        assert max(ids) < n and tok.decode(ids) == t
        # specials, pad and </s> never reach the text
        assert tok.decode([tok.gmask_id, tok.sop_id] + ids + [tok.command("<|user|>"), 2]) == t
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_native_tokenizer_still_native_and_tiktoken_refused(tmp_path):
    native = Tokenizer.train(["hello world 你好"] * 50, tmp_path / "native", vocab_size=300)
    assert isinstance(load_tokenizer(native.path), Tokenizer)
    from engine.train.convert import source_tokenizer
    # a native model exported with its tokenizer re-imports with it
    assert source_tokenizer(str(native.path.parent), 1024) == str(native.path)
    tik = tmp_path / "tokenizer.model"
    tik.write_bytes(b"IQ== 0\nIg== 1\nIw== 2\nJA== 3\n")
    with pytest.raises(ValueError, match="tiktoken tokenizer .GLM-4. is not supported"):
        load_tokenizer(tik)
    notes = []
    assert source_tokenizer(str(tmp_path), 1024, notes.append) is None
    assert len(notes) == 1 and "GLM-4's tiktoken tokenizer, which is not supported" in notes[0]


# ---- chat prompt and training layout ---------------------------------------------------
def test_chat_prompt_and_causal_examples(sp_model):
    tok = load_tokenizer(sp_model)
    cfg = GLMConfig.preset("tiny", padded_vocab_size=512, position_layout="causal1d",
                           chat_format="chatglm3")
    fmt = TranslationFormat(tok, cfg)
    src, tgt = tok.encode("Permission denied"), tok.encode("权限被拒绝")
    p = fmt.prompt(src)
    u, a = tok.command("<|user|>"), tok.command("<|assistant|>")
    assert p[:3] == [tok.gmask_id, tok.sop_id, u] and p[-1 - len(tok.encode("\n")):] == \
        [a] + tok.encode("\n")
    # each piece carries sentencepiece's dummy-prefix space, as in the reference's own
    # separately encoded metadata line and message
    text = tok.decode(p)
    assert text.count("\n") == 3 and text.split() == \
        "Translate the following English text into Chinese. Permission denied".split()
    assert fmt.stop_ids == [2, u, tok.command("<|observation|>")]
    ds = TranslationDataset([(src, tgt)], tok, 64, fmt=fmt, shuffle=False)
    ex = ds.example(0)
    assert ex.prefix_len == 0 and ex.position_ids == list(range(len(ex.input_ids)))
    assert set(ex.block_position_ids) == {0}
    # the prompt is what decoding is fed; the loss falls on the answer and </s> only
    assert ex.input_ids[:len(p)] == p
    assert [t for t in ex.labels if t != IGNORE] == tgt + [2]
    # chatglm2 and base models
    f2 = TranslationFormat(tok, GLMConfig.preset("tiny", position_layout="causal1d",
                                                 chat_format="chatglm2"))
    assert tok.decode(f2.prompt(src)).replace(" ", "").startswith("[Round1]\n\n问：Translate")
    assert tok.decode(f2.prompt(src)).endswith("\n\n答：")
    with pytest.raises(ValueError, match="causal1d"):
        TranslationFormat(tok, GLMConfig.preset("tiny"))


# ---- import -> fine-tune -> export -> import -------------------------------------------
def test_import_finetune_export_import(tmp_path, sp_model):
    from engine.train.convert import from_chatglm, native_model, to_chatglm
    src = make_chatglm_dir(str(tmp_path / "published"), "base", 2.0, tokenizer=sp_model)
    native = str(tmp_path / "native")
    from_chatglm(src, native, log=lambda *_: None)
    ck = ckpt_lib.Checkpoint(native)
    m = ck.meta["config"]["model"]
    assert (m["position_layout"], m["rope_scaling"], m["chat_format"]) == \
        ("causal1d", "base", "chatglm3")
    tok = load_tokenizer(os.path.join(native, "tokenizer.model"))
    assert isinstance(tok, ChatGLMTokenizer) and ck.meta["tokenizer_sha256"] == tok.sha256

    pairs = [(tok.encode(e), tok.encode(z)) for e, z in
             [("Permission denied", "权限被拒绝"), ("The file could not be opened.",
                                                  "无法打开文件。")]]
    cfg = build_run_config({"model": {"preset": "tiny"},
                            "train": {"steps": 3, "micro_batch_size": 2, "num_microbatches": 1,
                                      "seq_len": 48, "warmup_steps": 1, "lr": 1e-3,
                                      "log_every": 1, "eval_every": 100, "eval_batches": 1,
                                      "out_dir": str(tmp_path / "ft"), "init_from": native}})
    # the shape alone is not enough: a glm2d run from a causal1d checkpoint is refused
    cfg.model = GLMConfig.from_dict({**m, "position_layout": "glm2d", "chat_format": ""})
    with pytest.raises(ValueError, match="position_layout='glm2d' but the checkpoint"):
        Trainer.from_config(cfg, None, log=lambda *_: None, tokenizer_sha256=tok.sha256)
    cfg.model = GLMConfig.from_dict(m)
    fmt = TranslationFormat(tok, cfg.model)
    data = TranslationDataset(pairs, tok, 48, fmt=fmt)
    tr = Trainer.from_config(cfg, data, data, log=lambda *_: None, tokenizer_sha256=tok.sha256)
    hist = tr.fit()
    assert len(hist) == 3 and all(h.loss == h.loss for h in hist)
    path = tr.save(str(tmp_path / "ft" / "checkpoint"))
    tuned = native_model(ckpt_lib.Checkpoint(path))
    assert tuned.config == cfg.model

    out = str(tmp_path / "exported")
    to_chatglm(path, out)
    again = load_chatglm(out)
    assert again.config == tuned.config
    for (n, p), (n2, p2) in zip(tuned.named_parameters(), again.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n
    # the exported directory is a ChatGLM checkpoint the reference runs identically
    ids = fmt.prompt(pairs[0][0])
    ref = ChatGLMReference(out, "base")
    assert (again(torch.tensor([ids]))[0] - ref.logits(ids)).abs().max() < 2e-5


def test_triton_kernels_match_reference_causal(tmp_path):
    """The fused path (Triton under the interpreter on CPU) takes the causal 1D layout too:
    the attention kernel's prefix 0 is causal, the rotary kernel gets zero second-half
    angles."""
    d = make_chatglm_dir(str(tmp_path / "tri"), "position", 4.0)
    model = load_chatglm(d, kernels="triton")
    ids = list(range(5, 17))
    got = model(torch.tensor([ids]))[0]
    assert (got - ChatGLMReference(d, "position").logits(ids)).abs().max() < 1e-4


@pytest.mark.parametrize("scaling", ["none", "base", "position"])
def test_pruning_keeps_layout_and_rope(scaling):
    """Pruning keeps position_layout / chat_format; a head-dim cut under the exact rotary
    rule stays exact for an unscaled ("none") or base-scaled rope (the student scales the
    base), and is refused for position interpolation, which one rope_ratio cannot carry."""
    from test_prune import build, make_batch, prune_model, zero_qk_pair, zero_v_channel

    from engine.recipe.compress.importance import magnitude_importance
    from engine.recipe.compress.prune import PruneTarget, select
    model = build(position_layout="causal1d", chat_format="chatglm3", rope_scaling=scaling,
                  rope_ratio=4.0)
    c = model.config
    for layer in range(c.num_layers):
        for p in (2, 3):                      # keep pairs {0, 1} of each half (stride 1)
            zero_qk_pair(model, layer, p)
            zero_qk_pair(model, layer, p + 4)
        for ch in range(8, 16):
            zero_v_channel(model, layer, ch)
    imp = magnitude_importance(model)
    if scaling == "position":
        with pytest.raises(ValueError, match="rope_scaling='position'"):
            select(imp, c, PruneTarget(kv_channels=8))
        return
    pruned = prune_model(model, select(imp, c, PruneTarget(kv_channels=8)))
    pc = pruned.config
    assert (pc.position_layout, pc.chat_format, pc.rope_scaling) == ("causal1d", "chatglm3",
                                                                    "base")
    # stride 1 at d' = d/2: base' = sqrt(base), from the base this model really uses
    assert pc.rope_base == pytest.approx(c.rope_base ** 0.5)
    batch = make_batch()
    with torch.no_grad():
        assert (pruned(batch["input_ids"]) - model(batch["input_ids"])).abs().max() < 1e-4


def test_runs_from_a_checkpoint_take_its_layout():
    from model.config import with_layout_of
    run = GLMConfig.preset("tiny", kernels="torch")
    native = GLMConfig.preset("tiny", rope_ratio=0.5, hidden_dropout=0.1).to_dict()
    got = with_layout_of(run, native)
    assert got.rope_ratio == 0.5 and got.hidden_dropout == 0.0 and got.kernels == "torch"
    imported = GLMConfig.preset("small", position_layout="causal1d", chat_format="chatglm3",
                                rope_scaling="none").to_dict()
    got = with_layout_of(run, imported)
    assert got == GLMConfig.from_dict({**imported, "kernels": "torch"})
