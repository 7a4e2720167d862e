"""Keep sentencepiece byte-fallback pieces (<0x00> .. <0xFF>) in complete UTF-8 sequences.

A byte-fallback tokenizer spells a rare character as its UTF-8 bytes, one piece each. An
undertrained model happily emits a lead byte and then a word, or a stray continuation
byte, and the decoded text is full of U+FFFD. Generation masks, per row and per step, the
pieces that would break the sequence being written: a small state machine over the bytes
(RFC 3629 well-formed sequences, so no overlongs, surrogates or code points past
U+10FFFF). Outside a sequence every piece but continuation and never-valid bytes is
allowed; inside one only the continuation bytes that keep it well formed (not even the
end token, so a finished hypothesis is always whole). A row cut off by max_new_tokens
mid-sequence has that tail dropped (`trim`).

The tables are built once per tokenizer and live on the decoding device: one step is an
index_select and a masked_fill, no host sync.
"""
from __future__ import annotations

import torch

# token classes: what a piece is to the state machine
OTHER = 0                                 # not a byte piece, or an ASCII byte (whole char)
C80, C90, CA0 = 1, 2, 3                   # continuation bytes 80-8F, 90-9F, A0-BF
L2, LE0, LE, LED, LF0, LF, LF4 = 4, 5, 6, 7, 8, 9, 10  # lead bytes (see _byte_class)
INVALID = 11                              # C0, C1, F5-FF: in no well-formed sequence
N_CLASSES = 12

# states: 0 = between characters; otherwise what the next byte must be
FREE, NEED1, NEED2, NEED3, AFTER_E0, AFTER_ED, AFTER_F0, AFTER_F4 = range(8)
N_STATES = 8


def _byte_class(b: int) -> int:
    if b < 0x80:
        return OTHER
    if b < 0x90:
        return C80
    if b < 0xA0:
        return C90
    if b < 0xC0:
        return CA0
    if 0xC2 <= b <= 0xDF:
        return L2
    if b == 0xE0:
        return LE0
    if b == 0xED:
        return LED
    if 0xE1 <= b <= 0xEF:
        return LE
    if b == 0xF0:
        return LF0
    if 0xF1 <= b <= 0xF3:
        return LF
    if b == 0xF4:
        return LF4
    return INVALID


def _transitions() -> dict[tuple[int, int], int]:
    """(state, class) -> next state, for the allowed pairs only."""
    t = {(FREE, OTHER): FREE, (FREE, L2): NEED1, (FREE, LE0): AFTER_E0, (FREE, LE): NEED2,
         (FREE, LED): AFTER_ED, (FREE, LF0): AFTER_F0, (FREE, LF): NEED3,
         (FREE, LF4): AFTER_F4}
    for c in (C80, C90, CA0):
        t[(NEED1, c)], t[(NEED2, c)], t[(NEED3, c)] = FREE, NEED1, NEED2
    t[(AFTER_E0, CA0)] = NEED1                      # E0 A0-BF: no overlong
    t[(AFTER_ED, C80)] = t[(AFTER_ED, C90)] = NEED1  # ED 80-9F: no surrogate
    t[(AFTER_F0, C90)] = t[(AFTER_F0, CA0)] = NEED2  # F0 90-BF: no overlong
    t[(AFTER_F4, C80)] = NEED2                      # F4 80-8F: <= U+10FFFF
    return t


_TRANS = _transitions()


def _token_classes(tok) -> list[int]:
    """Class of every id of `tok` (Tokenizer or ChatGLMTokenizer: ids past the
    sentencepiece model, the appended specials, are no bytes)."""
    sp = tok.sp
    n = sp.get_piece_size()
    classes = [OTHER] * tok.vocab_size
    for i in range(n):
        if sp.is_byte(i):
            piece = sp.id_to_piece(i)  # "<0xE5>"
            classes[i] = _byte_class(int(piece[3:-1], 16))
    return classes


class Utf8Constraint:
    """Per-row UTF-8 state over a batch; see the module docstring."""

    def __init__(self, classes: list[int], device="cpu"):
        self.classes = classes
        self.has_bytes = any(c != OTHER for c in classes)
        allow = torch.zeros(N_STATES, N_CLASSES, dtype=torch.bool)
        nxt = torch.zeros(N_STATES, N_CLASSES, dtype=torch.long)  # disallowed: unused
        for (s, c), to in _TRANS.items():
            allow[s, c], nxt[s, c] = True, to
        cls = torch.tensor(classes, dtype=torch.long)
        self.device = torch.device(device)
        self._cls = cls.to(self.device)
        self._next = nxt.to(self.device)
        self._blocked = (~allow)[:, cls].to(self.device)  # [S, V]: True = masked
        self._other_blocked = (~allow)[:, OTHER].to(self.device)  # [S]

    @classmethod
    def for_tokenizer(cls, tok, device="cpu") -> "Utf8Constraint":
        """Built once per tokenizer and device, then reused (the tables cost a pass over
        the vocabulary)."""
        cache = tok.__dict__.setdefault("_utf8_constraints", {})
        key = str(torch.device(device))
        if key not in cache:
            cache[key] = cls(_token_classes(tok), device)
        return cache[key]

    def to(self, device) -> "Utf8Constraint":
        """The same constraint with its tables on `device` (copied once per device, not
        once per generate call)."""
        device = torch.device(device)
        if device == self.device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if str(device) not in copies:
            copies[str(device)] = Utf8Constraint(self.classes, device)
        return copies[str(device)]

    def initial(self, rows: int) -> torch.Tensor:
        return torch.full((rows,), FREE, dtype=torch.long, device=self.device)

    def mask(self, logits: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """-inf where the next piece would break row r's sequence. logits [rows, V'] with
        V' >= the tokenizer's size; padded vocabulary rows past it count as no bytes (as in
        `advance` and `trim`), so they too wait for a character to be complete."""
        if not self.has_bytes:
            return logits
        v = self._blocked.shape[1]
        blocked = self._blocked.index_select(0, state)
        if logits.shape[-1] > v:
            extra = self._other_blocked.index_select(0, state)
            blocked = torch.cat([blocked, extra[:, None].expand(-1, logits.shape[-1] - v)],
                                dim=1)
        return logits.masked_fill(blocked, float("-inf"))

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """State after each row appends tokens[r] (ids past the tokenizer count as
        OTHER)."""
        if not self.has_bytes:
            return state
        cls = self._cls.index_select(0, tokens.clamp(max=len(self.classes) - 1))
        cls = torch.where(tokens < len(self.classes), cls, torch.zeros_like(cls))
        return self._next[state, cls]

    def trim(self, ids: list[int]) -> list[int]:
        """`ids` without an unfinished byte sequence at its end (the budget ran out inside
        one). Host-side, once per output."""
        state, start = FREE, len(ids)
        for i, t in enumerate(ids):
            c = self.classes[t] if 0 <= t < len(self.classes) else OTHER
            if state == FREE:
                start = i
            if (state, c) not in _TRANS:
                raise ValueError(f"token {t} at {i} breaks a UTF-8 sequence: the ids were "
                                 "not generated under this constraint")
            state = _TRANS[(state, c)]
        return ids if state == FREE else ids[:start]
