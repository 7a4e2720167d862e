"""Generation under model.utf8_constraint never spells a broken UTF-8 sequence.

The model is the tiny GLM with random weights whose logits a forward hook pushes towards
the byte-fallback pieces (each step a random byte wins): unconstrained, it writes stray
continuation bytes and cut-off sequences (U+FFFD on decode); constrained, every output
of greedy, sampling and beam search decodes to valid text."""
import pytest
import torch

from model import GLM, GLMConfig
from model.chatglm_tokenizer import ChatGLMTokenizer
from model.generate import generate
from model.tokenizer import Tokenizer
from model.utf8_constraint import Utf8Constraint

# the vocabulary is small, so rare CJK characters (some 4-byte, CJK extension B) and
# unseen ones fall back to bytes
RARE = "龘靐齉爩鱻麤𠀋𪚥𠮷"
TEXT = (["The file could not be opened.", "Permission denied", "Save changes?",
         "无法打开文件。", "权限被拒绝", "错误：无效的选项"] * 30
        + [f"稀有字{c}" for c in RARE])
MODES = [dict(mode="greedy"), dict(mode="sample", seed=3, temperature=1.0),
         dict(mode="beam", num_beams=3)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.train(TEXT, tmp_path_factory.mktemp("tok"), vocab_size=320)


@pytest.fixture(scope="module")
def model():
    return GLM.build(GLMConfig.preset("tiny", init_std=0.3), seed=0).eval()


def byte_ids(tok):
    return [i for i in range(tok.sp.get_piece_size()) if tok.sp.is_byte(i)]


class Bias:
    """Forward hook: bias the byte pieces (+ random noise per call, so each step a
    different byte tends to win) or ban them."""

    def __init__(self, ids, vocab_size, ban=False, seed=0, padding=False):
        self.ids, self.vocab, self.ban = torch.tensor(ids), vocab_size, ban
        self.padding = padding  # keep the padded vocabulary rows past the tokenizer
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, module, args, out):
        out = out.clone()
        if not self.padding:
            out[..., self.vocab:] = float("-inf")
        else:  # ... and make them as likely as a byte
            noise = torch.rand(out[..., self.vocab:].shape, generator=self.gen) * 20
            out[..., self.vocab:] += 30 + noise
        if self.ban:
            out[..., self.ids] = float("-inf")
        else:
            noise = torch.rand(out.shape[:-1] + (len(self.ids),), generator=self.gen) * 20
            out[..., self.ids] += 30 + noise
        return out


def run(model, tok, hook, utf8, vocab_size=-1, **kw):
    handle = model.register_forward_hook(hook)
    try:
        prompts = [tok.encode(s) + [tok.gmask_id] for s in
                   ("Permission denied", "无法打开", "Save changes?", "x")]
        return generate(model, prompts, max_new_tokens=13, eos_id=tok.eop_id,
                        pad_id=tok.pad_id, sop_id=tok.sop_id, utf8=utf8,
                        vocab_size=tok.vocab_size if vocab_size == -1 else vocab_size, **kw)
    finally:
        handle.remove()


def valid(tok, ids) -> bool:
    pieces = [tok.sp.id_to_piece(i) for i in ids if tok.sp.is_byte(i)]
    raw = bytes(int(p[3:-1], 16) for p in pieces)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "\ufffd" not in tok.decode(ids)


def test_tokenizer_falls_back_to_bytes(tok):
    assert len(byte_ids(tok)) == 256
    # a character the training text never had is its 3 UTF-8 bytes, and decodes back
    assert sum(tok.sp.is_byte(i) for i in tok.encode("齾")) == 3
    assert tok.decode(tok.encode(RARE)) == RARE


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: kw["mode"])
def test_unconstrained_decoding_breaks_utf8(model, tok, kw):
    # the test below would prove nothing if the biased model emitted valid text anyway
    out = run(model, tok, Bias(byte_ids(tok), tok.vocab_size), None, **kw)
    assert not all(valid(tok, o) for o in out)


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: kw["mode"])
def test_constrained_decoding_is_valid_utf8(model, tok, kw):
    utf8 = Utf8Constraint.for_tokenizer(tok)
    out = run(model, tok, Bias(byte_ids(tok), tok.vocab_size), utf8, **kw)
    assert all(valid(tok, o) for o in out), [tok.decode(o) for o in out]
    # the model still writes the rare characters, now whole: at least one multi-byte one
    text = "".join(tok.decode(o) for o in out)
    assert any(ord(c) > 0x7F for c in text)


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: kw["mode"])
def test_padded_vocabulary_rows_wait_for_a_whole_character(model, tok, kw):
    # no vocab_size: ids past the tokenizer (no text) compete with the bytes, and count
    # as no byte to the constraint: never inside a character
    bias = Bias(byte_ids(tok), tok.vocab_size, padding=True)
    out = run(model, tok, bias, Utf8Constraint.for_tokenizer(tok), vocab_size=None, **kw)
    utf8 = Utf8Constraint.for_tokenizer(tok)
    assert any(t >= tok.vocab_size for o in out for t in o)
    assert all(utf8.trim(o) == o for o in out)
    assert all(valid(tok, [t for t in o if t < tok.vocab_size]) for o in out)


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: kw["mode"])
def test_constraint_leaves_valid_outputs_alone(model, tok, kw):
    # no byte piece can win: the constraint must not change a single token
    ban = Bias(byte_ids(tok), tok.vocab_size, ban=True)
    plain = run(model, tok, ban, None, **kw)
    constrained = run(model, tok, ban, Utf8Constraint.for_tokenizer(tok), **kw)
    assert plain == constrained
    assert any(plain)


def test_cut_off_sequence_is_dropped(tok):
    utf8 = Utf8Constraint.for_tokenizer(tok)
    b = {int(p[3:-1], 16): i for i in byte_ids(tok) for p in [tok.sp.id_to_piece(i)]}
    word = tok.encode("Save")
    e9be98 = [b[0xE9], b[0xBE], b[0x98]]  # 龘
    assert utf8.trim(word + e9be98) == word + e9be98
    assert utf8.trim(word + e9be98 + e9be98[:2]) == word + e9be98
    assert utf8.trim(word + [b[0xF0], b[0xA0]]) == word
    with pytest.raises(ValueError, match="breaks a UTF-8 sequence"):
        utf8.trim(word + [b[0xBE]])


def test_state_machine_rejects_ill_formed_sequences(tok):
    utf8 = Utf8Constraint.for_tokenizer(tok)
    b = {int(p[3:-1], 16): i for i in byte_ids(tok) for p in [tok.sp.id_to_piece(i)]}
    V = tok.vocab_size
    state = utf8.initial(1)
    masked = utf8.mask(torch.zeros(1, V), state)[0]
    assert masked[b[0x41]] == 0 and masked[b[0xE9]] == 0 and masked[tok.encode("Save")[0]] == 0
    for bad in (0x80, 0xBF, 0xC0, 0xC1, 0xF5, 0xFF):
        assert masked[b[bad]] == float("-inf")
    for lead, ok, bad in ((0xE0, 0xA0, 0x9F), (0xED, 0x9F, 0xA0), (0xF0, 0x90, 0x8F),
                          (0xF4, 0x8F, 0x90)):
        s = utf8.advance(state, torch.tensor([b[lead]]))
        m = utf8.mask(torch.zeros(1, V), s)[0]
        assert m[b[ok]] == 0 and m[b[bad]] == float("-inf")
        assert m[tok.eop_id] == float("-inf")  # no end token inside a character


def test_chatglm_tokenizer_has_the_same_byte_pieces(tmp_path):
    from tests.chatglm_ref import train_chatglm_sp
    ctok = ChatGLMTokenizer(train_chatglm_sp(str(tmp_path)))
    utf8 = Utf8Constraint.for_tokenizer(ctok)
    assert utf8.has_bytes and len(utf8.classes) == ctok.vocab_size
    # the appended specials (sop, <|user|>, ...) are no bytes
    assert all(c == 0 for c in utf8.classes[ctok.n_words:])
    ids = ctok.encode("龘")  # not in its training text: bytes
    assert utf8.trim(ids) == ids and ctok.decode(ids) == "龘"
    assert Utf8Constraint.for_tokenizer(ctok) is utf8  # built once per tokenizer


def test_no_byte_pieces_is_a_no_op():
    utf8 = Utf8Constraint([0] * 50)
    logits = torch.randn(2, 64)
    assert not utf8.has_bytes
    assert torch.equal(utf8.mask(logits, utf8.initial(2)), logits)


def test_evaluation_translates_without_replacement_characters(model, tok):
    # what the demo and the paper report print: engine.recipe.evaluate builds the constraint
    from engine.recipe.evaluate import translate
    handle = model.register_forward_hook(Bias(byte_ids(tok), tok.vocab_size))
    try:
        hyps, _, n = translate(model, tok, ["Success", "Permission denied"],
                               max_new_tokens=9)
    finally:
        handle.remove()
    assert n > 0 and all("\ufffd" not in h for h in hyps), hyps


def test_tables_are_copied_once_per_device(tok):
    utf8 = Utf8Constraint.for_tokenizer(tok)
    assert utf8.to("cpu") is utf8
    meta = utf8.to("meta")
    assert meta is utf8.to("meta") and meta._blocked.device.type == "meta"
