"""A sentencepiece tokenizer for English/Chinese software text, with GLM's special tokens.

    tok = Tokenizer.train(texts, "data/tokenizer", vocab_size=8000)
    tok = Tokenizer("data/tokenizer")            # or the tokenizer.model file itself

Special tokens have fixed ids in every tokenizer this module trains (the datasets and
checkpoints rely on them): <pad>=0, <unk>=1, then the control symbols in SPECIAL_TOKENS
order from 2. They are *control* symbols, so no input text can ever produce one (a
catalogue string that literally reads "<sop>" stays ordinary text); the data pipeline
inserts them by id.

Training choices: unigram LM; no normalisation ("identity": NFKC would rewrite the
full-width punctuation of Chinese text and could touch placeholders) and whitespace kept
as is, so decode(encode(s)) == s; digits split one per piece; byte fallback so a rare
character is bytes, never <unk>. One trainer thread and a fixed seed: sentencepiece's
result depends on the thread count, and the same corpus must give the same file.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

MODEL_FILE = "tokenizer.model"
PAD, UNK = "<pad>", "<unk>"
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<en>", "<zh>")
FIXED_IDS = {PAD: 0, UNK: 1, **{t: i + 2 for i, t in enumerate(SPECIAL_TOKENS)}}


@dataclass(frozen=True)
class SpecialIds:
    """The ids a data pipeline needs, without carrying the sentencepiece model around."""
    pad: int = FIXED_IDS[PAD]
    unk: int = FIXED_IDS[UNK]
    mask: int = FIXED_IDS["[MASK]"]
    gmask: int = FIXED_IDS["[gMASK]"]
    smask: int = FIXED_IDS["[sMASK]"]
    sop: int = FIXED_IDS["<sop>"]
    eop: int = FIXED_IDS["<eop>"]
    en: int = FIXED_IDS["<en>"]
    zh: int = FIXED_IDS["<zh>"]

    def all(self) -> set[int]:
        return {self.pad, self.unk, self.mask, self.gmask, self.smask, self.sop, self.eop,
                self.en, self.zh}


class SpecialIdAccess:
    """`tok.sop_id` and friends, read off `self.special_ids` (both tokenizers)."""

    @property
    def pad_id(self) -> int:
        return self.special_ids.pad

    @property
    def unk_id(self) -> int:
        return self.special_ids.unk

    @property
    def mask_id(self) -> int:
        return self.special_ids.mask

    @property
    def gmask_id(self) -> int:
        return self.special_ids.gmask

    @property
    def smask_id(self) -> int:
        return self.special_ids.smask

    @property
    def sop_id(self) -> int:
        return self.special_ids.sop

    @property
    def eop_id(self) -> int:
        return self.special_ids.eop


class SentencePieceTokenizer(SpecialIdAccess):
    """What both tokenizers share: a sentencepiece model loaded from bytes, and text <->
    ids. Subclasses set `_skip`, the ids that decode leaves out."""

    def _load(self, path: Path, data: bytes):
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
            raise ValueError(f"{path}: corrupt tokenizer model "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                             ) from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` from the sentencepiece model alone, no BOS/EOS (the data
        pipeline adds GLM's own markers by id)."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids) -> str:
        """Text of `ids`, skipping the special ids (`_skip`)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                             f"(size {self.vocab_size})")
        return self.sp.decode([i for i in ids if i not in self._skip])


class Tokenizer(SentencePieceTokenizer):
    kind = "glm"

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise ValueError(f"{path}: tokenizer model not found")
        self._load(path, path.read_bytes())
        for piece, want in FIXED_IDS.items():
            got = self.sp.piece_to_id(piece)
            if got != want or self.sp.id_to_piece(want) != piece:
                raise ValueError(f"{path}: not a GLM tokenizer ({piece} has id {got}, "
                                 f"expected {want}); retrain it with Tokenizer.train")
        self.special_ids = SpecialIds()
        self._skip = self.special_ids.all()  # pad, unk, masks, sop/eop, language tags

    # ---- training ----------------------------------------------------------------------
    @classmethod
    def train(cls, texts, out_dir: str | os.PathLike, vocab_size: int = 8000,
              model_type: str = "unigram", seed: int = 0) -> "Tokenizer":
        """Train on an iterable of strings and write `out_dir/tokenizer.model` (atomically:
        a failed run leaves an existing model untouched). Deterministic for equal input."""
        if vocab_size < len(FIXED_IDS) + 256 + 1:
            raise ValueError(f"vocab_size={vocab_size} must exceed the "
                             f"{len(FIXED_IDS)} special + 256 byte-fallback pieces")
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type={model_type!r} must be 'unigram' or 'bpe'")
        texts = [t for t in texts if t]
        if not texts:
            raise ValueError("no text to train the tokenizer on")
        spm.set_random_generator_seed(seed)
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=buf,
                vocab_size=vocab_size, model_type=model_type,
                character_coverage=0.9995, byte_fallback=True, split_digits=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                pad_id=FIXED_IDS[PAD], unk_id=FIXED_IDS[UNK], bos_id=-1, eos_id=-1,
                control_symbols=list(SPECIAL_TOKENS),
                # a small corpus may not support the full vocabulary: take what it has
                hard_vocab_limit=False,
                # the whole corpus, in order: no sampling, no thread-dependent merges
                input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
                max_sentence_length=1 << 14, minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"sentencepiece training failed: {str(e).splitlines()[0]}") from None
        out = Path(out_dir) / MODEL_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{MODEL_FILE}.", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return cls(out)

    # ---- use -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    @property
    def en_id(self) -> int:
        return self.special_ids.en

    @property
    def zh_id(self) -> int:
        return self.special_ids.zh

    def __repr__(self):
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike):
    """A native Tokenizer, or the ChatGLM2/3 one (model/chatglm_tokenizer.py) when the
    sentencepiece model has ChatGLM's layout (<unk>=0, <s>=1, </s>=2, no <pad>)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ValueError(f"{path}: tokenizer model not found")
    data = path.read_bytes()
    from model.chatglm_tokenizer import ChatGLMTokenizer, is_tiktoken
    if is_tiktoken(data):
        return ChatGLMTokenizer(path, data)  # raises the one-line refusal
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except Exception:  # noqa: BLE001 - corrupt: let Tokenizer word the error
        return Tokenizer(path)
    if sp.piece_to_id(PAD) == FIXED_IDS[PAD] and sp.id_to_piece(0) == PAD:
        return Tokenizer(path)
    if sp.unk_id() == 0 and sp.eos_id() >= 0:
        return ChatGLMTokenizer(path, data)
    return Tokenizer(path)  # names what is wrong

