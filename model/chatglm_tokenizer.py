"""The ChatGLM2/3 tokenizer: their published `tokenizer.model` (sentencepiece) with the
special tokens THUDM's tokenization_chatglm.py appends after the sentencepiece pieces.

    n = pieces in tokenizer.model (64789 for chatglm2/3-6b)
    [MASK]=n  [gMASK]=n+1  [sMASK]=n+2  sop=n+3  eop=n+4
    <|system|>=n+5  <|user|>=n+6  <|assistant|>=n+7  <|observation|>=n+8   (ChatGLM3 only)
    pad = <unk> = 0, <s> = 1, </s> = 2 (the sentencepiece model's own ids)

ChatGLM2's reference defines the first five only; the role tokens sit after them, so every
id ChatGLM2 uses is the same here. Text is encoded by the sentencepiece model alone, as
the reference's SPTokenizer.encode does; specials are inserted by id, never parsed from
text. GLM-4's tokenizer.model is a tiktoken rank file, not sentencepiece: refused (see
`is_tiktoken`), since supporting it would add a dependency for one model family.
"""
from __future__ import annotations

from pathlib import Path

from model.tokenizer import SentencePieceTokenizer, SpecialIds

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


def is_tiktoken(data: bytes) -> bool:
    """GLM-4's tokenizer.model: lines of `<base64 token> <rank>`."""
    head = data[:4096].split(b"\n")[:4]
    return bool(head) and all(len(line.split()) == 2 and line.split()[1].isdigit()
                              for line in head if line)


class ChatGLMTokenizer(SentencePieceTokenizer):
    """Same interface as model.tokenizer.Tokenizer (encode/decode/ids/special_ids/sha256)."""

    kind = "chatglm"

    def __init__(self, path, data: bytes | None = None):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if data is None:
            if not path.is_file():
                raise ValueError(f"{path}: tokenizer model not found")
            data = path.read_bytes()
        if is_tiktoken(data):
            raise ValueError(f"{path}: a tiktoken tokenizer (GLM-4) is not supported; only "
                             "ChatGLM2/3's sentencepiece tokenizer.model is")
        self._load(path, data)
        n = self.sp.get_piece_size()
        self.n_words = n
        self.specials = {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.sp.unk_id() < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: not a ChatGLM tokenizer (no <unk> or </s> piece)")
        s = self.specials
        # en / zh: ChatGLM has no language tags; -1 makes any use of them fail loudly
        self.special_ids = SpecialIds(pad=self.sp.unk_id(), unk=self.sp.unk_id(),
                                      mask=s["[MASK]"], gmask=s["[gMASK]"], smask=s["[sMASK]"],
                                      sop=s["sop"], eop=s["eop"], en=-1, zh=-1)
        # decode skips the special tokens, pad, <s> and </s>
        self._skip = set(s.values()) | {self.pad_id, self.bos_id, self.eos_id}

    @property
    def vocab_size(self) -> int:
        return self.n_words + len(SPECIAL_TOKENS)

    def command(self, token: str) -> int:
        """Id of a special token by name, e.g. command("<|user|>")."""
        if token not in self.specials:
            raise ValueError(f"{token!r} is not a ChatGLM special token "
                             f"({', '.join(SPECIAL_TOKENS)})")
        return self.specials[token]

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        if i >= self.n_words:
            return SPECIAL_TOKENS[i - self.n_words]
        return self.sp.id_to_piece(i)

    def __repr__(self):
        return f"ChatGLMTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
