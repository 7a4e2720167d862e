"""model/tokenizer.py: training, fixed special ids, round trips, determinism, bad files."""
import hashlib
import io
import random

import pytest
import sentencepiece as spm

from model.tokenizer import FIXED_IDS, SPECIAL_TOKENS, Tokenizer

EN_WORDS = ("file open save error cannot read write directory permission denied option "
            "invalid archive member missing argument too many links").split()
ZH_CHARS = "文件打开保存错误无法读取写入目录权限被拒绝选项无效的归档成员缺少参数过多链接"


def synthetic_lines(n=200, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines.append(" ".join(rng.choice(EN_WORDS) for _ in range(rng.randint(2, 8)))
                     + f" '%s' {rng.randint(0, 999)}")
        lines.append("".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(3, 12))) + "：%d")
    return lines


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.train(synthetic_lines(), tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_special_ids_are_fixed(tok):
    assert (tok.pad_id, tok.unk_id, tok.mask_id, tok.gmask_id, tok.smask_id, tok.sop_id,
            tok.eop_id, tok.en_id, tok.zh_id) == tuple(range(9))
    for piece, i in FIXED_IDS.items():
        assert tok.id_to_piece(i) == piece
    assert 300 < tok.vocab_size <= 400


@pytest.mark.parametrize("text", [
    "cannot open file '%s': permission denied",
    "无法打开文件“%s”：权限被拒绝",
    "%1$s of %(name)s {0} -- 0x1F 2024",
    "  two  spaces and a trailing one ",
    "未见过的字符 ☃ 𠀀 and ünïcödé",          # not in training data: byte fallback
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert not set(ids) & set(range(9))        # text never produces a special token
    assert tok.decode(ids) == text


def test_digits_are_split(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode("error 2024")]
    assert all(len(p.strip("▁")) <= 1 for p in pieces if any(c.isdigit() for c in p))


def test_special_text_is_plain_text_and_decode_skips_specials(tok):
    ids = tok.encode("<sop> [MASK]")
    assert tok.mask_id not in ids and tok.sop_id not in ids
    body = tok.encode("save file")
    assert tok.decode([tok.en_id] + body + [tok.gmask_id, tok.sop_id, tok.eop_id,
                                            tok.pad_id]) == "save file"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_training_is_deterministic_and_sha_is_of_the_file(tok, tmp_path):
    again = Tokenizer.train(synthetic_lines(), tmp_path / "again", vocab_size=400)
    assert again.sha256 == tok.sha256
    assert tok.sha256 == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    other = Tokenizer.train(synthetic_lines(seed=1), tmp_path / "other", vocab_size=400)
    assert other.sha256 != tok.sha256
    # loading by folder or by file gives the same model
    assert Tokenizer(tok.path.parent).encode("open file") == Tokenizer(tok.path).encode("open file")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}/nothing.*not found"):
        Tokenizer(tmp_path / "nothing")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(ValueError, match=f"{bad}: corrupt"):
        Tokenizer(tmp_path)


def test_foreign_sentencepiece_model_is_rejected(tmp_path):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(synthetic_lines(50)),
                                   model_writer=buf, vocab_size=120, minloglevel=2,
                                   hard_vocab_limit=False)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not a GLM tokenizer"):
        Tokenizer(path)


def test_failed_training_leaves_existing_model(tok, tmp_path):
    good = Tokenizer.train(synthetic_lines(), tmp_path, vocab_size=400)
    before = good.path.read_bytes()
    # 280 pieces cannot hold the specials + 256 bytes + every character seen: sentencepiece fails
    with pytest.raises(ValueError, match="sentencepiece training failed"):
        Tokenizer.train(synthetic_lines(), tmp_path, vocab_size=280)
    assert good.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model"]
    with pytest.raises(ValueError, match="vocab_size=100"):
        Tokenizer.train(synthetic_lines(), tmp_path, vocab_size=100)
    assert len(SPECIAL_TOKENS) == 7
