"""Deterministic, stateless datasets: `get_batch(index, batch_size)` is a pure function of
(seed, index, batch_size), so a run resumes exactly from the step number alone.

Sample j of the whole run is `index * batch_size + r`. Epoch e visits the data in a
permutation seeded by (seed, e); everything random inside one sample (span positions and
lengths, the [gMASK] split, the translation direction) comes from a torch.Generator
seeded by (seed, j). Batches come out of `model.masks.collate` at a fixed seq_len:
input_ids, position_ids, block_position_ids, labels, prefix_lens; packed translation rows
come out of `model.masks.pack`, which adds doc_starts and makes prefix_lens per token.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from engine.recipe.data.corpus import read_tsv
from engine.recipe.data.shards import Shard
from engine.recipe.data.packing import best_fit_rows
from model.masks import (GLMExample, causal_example, collate,
                         corrupt_spans, gmask_example, pack)
from model.tokenizer import SpecialIds

__all__ = ["PretrainDataset", "TranslationDataset", "read_tsv", "mix_seed"]

# independent random streams derived from one seed
_PERMUTE, _SAMPLE, _KINDS, _PACK = 0, 1, 2, 3


def mix_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer keys (SeedSequence hashing, so
    (seed, 1) and (seed + 1, 0) do not collide the way seed * k + i can)."""
    lo, hi = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(hi) << 31) ^ int(lo)


def _special_ids(ids) -> SpecialIds:
    """Accept SpecialIds or anything carrying them (a Tokenizer)."""
    ids = getattr(ids, "special_ids", ids)
    if not isinstance(ids, SpecialIds):
        raise ValueError(f"ids={ids!r} must be a SpecialIds or a Tokenizer")
    return ids


def open_shard(source, ids) -> Shard:
    """A Shard (prefix or Shard) checked against the tokenizer it is read with, when `ids`
    is a Tokenizer (it has a sha256): shards record their tokenizer's sha256, and tokens
    of another vocabulary train or evaluate silently into nonsense."""
    want = getattr(ids, "sha256", None)
    shard = source if isinstance(source, Shard) else Shard(source, expect_tokenizer_sha256=want)
    if want is not None and shard.tokenizer_sha256 != want:
        raise ValueError(f"{shard.prefix}: written with tokenizer {shard.tokenizer_sha256[:12]}, "
                         f"read with {want[:12]}; rerun prepare_data --force")
    return shard


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


class _EpochCache:
    """Keeps the last few epoch layouts; a layout is a pure function of the epoch, so
    the cache changes speed only, never results."""

    def __init__(self, build, size: int = 2):
        self.build, self.size, self.items = build, size, OrderedDict()

    def __call__(self, epoch: int):
        if epoch not in self.items:
            self.items[epoch] = self.build(epoch)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        self.items.move_to_end(epoch)
        return self.items[epoch]


# ---- pretraining ------------------------------------------------------------------------
def span_capacity(seq_len: int, ratio: float) -> int:
    """Longest window n whose span corruption always fits seq_len: corrupt_spans masks
    max(1, round(ratio * n)) tokens in at most that many spans, and each span adds two
    tokens (its mask in Part A, its <sop> in Part B)."""
    n = seq_len
    while n > 0 and n + 2 * max(1, round(ratio * n)) > seq_len:
        n -= 1
    return n


class PretrainDataset:
    """Packed documents from a pretrain shard, with a GLM or causal objective.

    objective "glm": each sample is, 50/50 (gmask_prob), either short-span blank infilling
    (~mask_ratio of the tokens in Poisson(mean_span) spans, one [MASK] each) or [gMASK]
    long-suffix generation (a suffix of 50-100% of the window); "causal": next token.

    Packing: per epoch, documents are permuted and packed greedily, whole, into windows
    sized so the *corrupted* sample still fits seq_len (span windows are the conservative
    `span_capacity`, [gMASK] windows seq_len - 2, causal windows seq_len + 1 since
    inputs/labels shift by one). A document longer than the smallest window is cut into
    window-sized pieces once, up front. Unused tail positions are padding.
    """

    OBJECTIVES = ("glm", "causal")

    def __init__(self, shard, ids, seq_len: int, objective: str = "glm", seed: int = 0,
                 mask_ratio: float = 0.15, mean_span: float = 3.0, gmask_prob: float = 0.5):
        self.shard = open_shard(shard, ids)
        self.ids = _special_ids(ids)
        _check_positive("seq_len", seq_len)
        if objective not in self.OBJECTIVES:
            raise ValueError(f"objective={objective!r} must be one of {self.OBJECTIVES}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio} must be in (0, 1)")
        if mean_span <= 0:
            raise ValueError(f"mean_span={mean_span} must be positive")
        if not 0.0 <= gmask_prob <= 1.0:
            raise ValueError(f"gmask_prob={gmask_prob} must be in [0, 1]")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.seq_len, self.objective, self.seed = seq_len, objective, seed
        self.mask_ratio, self.mean_span, self.gmask_prob = mask_ratio, mean_span, gmask_prob

        if objective == "causal":
            self.capacity = {"causal": seq_len + 1}
        else:
            self.capacity = {"span": span_capacity(seq_len, mask_ratio), "gmask": seq_len - 2}
        smallest = min(self.capacity.values())
        if smallest < 2:
            raise ValueError(f"seq_len={seq_len} is too short for the {objective} objective")
        # cut documents into pieces no longer than the smallest window: [P] starts, lengths
        lengths = self.shard.doc_lengths()
        n_pieces = np.maximum(1, -(-lengths // smallest))
        doc_of = np.repeat(np.arange(lengths.size), n_pieces)
        k = np.arange(doc_of.size) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
        self.piece_start = self.shard.offsets[doc_of] + k * smallest
        self.piece_len = np.minimum(smallest, lengths[doc_of] - k * smallest)
        # a causal window of one token has nothing to predict: drop such tail pieces
        keep = self.piece_len >= (2 if objective == "causal" else 1)
        self.piece_start, self.piece_len = self.piece_start[keep], self.piece_len[keep]
        if self.piece_len.size == 0:
            raise ValueError(f"{self.shard.prefix}: shard has no tokens to train on")
        self._layout = _EpochCache(self._build_layout)
        self._epoch_sizes: list[int] = []

    # -- epoch layout: which pieces form sample b of epoch e, and its objective ---------
    def _build_layout(self, epoch: int):
        rng = np.random.default_rng(mix_seed(self.seed, _PERMUTE, epoch))
        order = rng.permutation(self.piece_len.size)
        if self.objective == "causal":
            kinds = np.array(["causal"])
            kind_of = np.zeros(order.size, dtype=np.int64)
        else:
            kinds = np.array(["span", "gmask"])
            krng = np.random.default_rng(mix_seed(self.seed, _KINDS, epoch))
            # bins never outnumber pieces, so one draw per piece covers every bin
            kind_of = (krng.random(order.size) < self.gmask_prob).astype(np.int64)
        caps = [self.capacity[str(k)] for k in kinds]
        lens = self.piece_len[order].tolist()
        bounds, fill, b = [0], 0, 0
        for i, n in enumerate(lens):
            if fill and fill + n > caps[kind_of[b]]:
                bounds.append(i)
                b += 1
                fill = 0
            fill += n
        bounds.append(len(lens))
        return order, np.asarray(bounds), kinds[kind_of[:len(bounds) - 1]]

    def samples_in_epoch(self, epoch: int) -> int:
        while len(self._epoch_sizes) <= epoch:
            self._epoch_sizes.append(len(self._layout(len(self._epoch_sizes))[1]) - 1)
        return self._epoch_sizes[epoch]

    def _locate(self, j: int) -> tuple[int, int]:
        epoch = 0
        while j >= self.samples_in_epoch(epoch):
            j -= self.samples_in_epoch(epoch)
            epoch += 1
        return epoch, j

    def window(self, j: int) -> tuple[list[int], str]:
        """Tokens of sample j before corruption, and its objective."""
        epoch, b = self._locate(j)
        order, bounds, kinds = self._layout(epoch)
        pieces = order[bounds[b]:bounds[b + 1]]
        tokens = np.concatenate([self.shard.tokens[s:s + n] for s, n in
                                 zip(self.piece_start[pieces], self.piece_len[pieces])])
        return tokens.astype(np.int64).tolist(), str(kinds[b])

    def example(self, j: int) -> GLMExample:
        if j < 0:
            raise ValueError(f"sample index {j} must be >= 0")
        tokens, kind = self.window(j)
        ids = self.ids
        if kind == "causal":
            return causal_example(tokens)
        g = torch.Generator().manual_seed(mix_seed(self.seed, _SAMPLE, j))
        if kind == "span":
            return corrupt_spans(tokens, ids.mask, ids.sop, ids.eop, g,
                                 ratio=self.mask_ratio, mean_span=self.mean_span)
        # [gMASK]: generate a suffix of 50-100% of the window (GLM's long-span objective)
        n = len(tokens)
        suffix = int(torch.randint(max(1, math.ceil(n / 2)), n + 1, (1,), generator=g))
        return gmask_example(tokens, n - suffix, ids.gmask, ids.sop, ids.eop)

    def get_batch(self, index: int, batch_size: int) -> dict:
        _check_positive("batch_size", batch_size)
        if index < 0:
            raise ValueError(f"index={index} must be >= 0")
        examples = [self.example(index * batch_size + r) for r in range(batch_size)]
        return collate(examples, self.seq_len, self.ids.pad)


# ---- translation ------------------------------------------------------------------------
class TranslationDataset:
    """`<en> source [gMASK] <sop> target <eop>`: Part A is "<en> source [gMASK]", the one
    span is the target; loss falls on the target tokens and the closing <eop> only.

    direction "en-zh" (default), "zh-en" (`<zh> chinese [gMASK] <sop> english <eop>`), or
    "both" (each sample flips a coin). source: a translation shard (prefix or Shard, fields
    en, zh), a pairs .tsv (needs `tokenizer`), or a list of (en_ids, zh_ids).

    fmt (engine/recipe/data/prompts.py: TranslationFormat) lays a pair out for the model being
    trained: by default the native GLM layout above; for an imported ChatGLM model its
    causal 1D sequence in its chat prompt, loss on the answer and </s>.

    pack: a sample is a row of several pairs (model/masks.py `pack`: each attends only to
    itself), chosen per epoch by best fit over windows of `pack_window` pairs of the
    epoch's order (engine/recipe/data/packing.py); with "both", each visit of a pair draws
    its direction from a per-epoch stream. Without pack, one pair per row, right-padded.
    """

    DIRECTIONS = ("en-zh", "zh-en", "both")

    def __init__(self, source, ids, seq_len: int, direction: str = "en-zh", seed: int = 0,
                 tokenizer=None, shuffle: bool = True, fmt=None, pack: bool = False,
                 pack_window: int = 1024):
        from engine.recipe.data.prompts import TranslationFormat
        self.ids = _special_ids(ids if ids is not None else tokenizer)
        self.fmt = fmt if fmt is not None else TranslationFormat(self.ids)
        _check_positive("seq_len", seq_len)
        if seq_len < 5:
            raise ValueError(f"seq_len={seq_len} must be >= 5 (tag, source, [gMASK], <sop>, "
                             "target)")
        need = max(self.fmt.overhead(d) for d in ("en-zh", "zh-en")) + 1
        if seq_len < need:
            raise ValueError(f"seq_len={seq_len} must be >= {need} for the {self.fmt.style} "
                             "prompt (its fixed tokens plus one source and one target token)")
        if direction not in self.DIRECTIONS:
            raise ValueError(f"direction={direction!r} must be one of {self.DIRECTIONS}")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.seq_len, self.direction, self.seed, self.shuffle = seq_len, direction, seed, shuffle
        self.pairs = self._load(source, tokenizer, tokenizer if tokenizer is not None else ids)
        if not self.pairs:
            raise ValueError(f"translation source {source!r} holds no pairs")
        self._perm = _EpochCache(self._permutation)
        if pack_window <= 0:
            raise ValueError(f"pack_window={pack_window} must be positive")
        self.pack, self.pack_window = bool(pack), pack_window
        self._rows = _EpochCache(self._pack_layout)
        self._epoch_rows: list[int] = []

    @staticmethod
    def _load(source, tokenizer, reader=None) -> list[tuple[list[int], list[int]]]:
        if isinstance(source, list):
            return [(list(map(int, en)), list(map(int, zh))) for en, zh in source]
        if isinstance(source, (str, os.PathLike)) and str(source).endswith(".tsv"):
            if tokenizer is None:
                raise ValueError(f"{source}: a .tsv source needs tokenizer= to encode it")
            text = read_tsv(Path(source))
            en = tokenizer.encode_batch([e for e, _ in text])
            zh = tokenizer.encode_batch([z for _, z in text])
            return list(zip(en, zh))
        shard = open_shard(source, reader)
        if shard.fields != ("en", "zh"):
            raise ValueError(f"{shard.prefix}: fields {shard.fields} are not ('en', 'zh'); "
                             "not a translation shard")
        return [(en.astype(np.int64).tolist(), zh.astype(np.int64).tolist())
                for en, zh in (shard[i] for i in range(len(shard)))]

    def __len__(self) -> int:
        return len(self.pairs)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.pairs))
        return np.random.default_rng(mix_seed(self.seed, _PERMUTE, epoch)).permutation(
            len(self.pairs))

    def pair_index(self, j: int) -> int:
        epoch, i = divmod(j, len(self.pairs))
        return int(self._perm(epoch)[i])

    def _direction(self, j: int) -> str:
        if self.direction != "both":
            return self.direction
        g = torch.Generator().manual_seed(mix_seed(self.seed, _SAMPLE, j))
        return "zh-en" if torch.rand((), generator=g).item() < 0.5 else "en-zh"

    def fit(self, src: list[int], tgt: list[int],
            direction: str = "en-zh") -> tuple[list[int], list[int]]:
        """Truncate the ends of source and target to what the layout leaves of seq_len
        (glm: tag, [gMASK], <sop> take 3), sharing the room evenly when both are long."""
        room = self.seq_len - self.fmt.overhead(direction) + 1   # the end token: in labels
        if len(src) + len(tgt) <= room:
            return src, tgt
        half = room // 2
        if len(src) <= half:
            return src, tgt[:room - len(src)]
        if len(tgt) <= room - half:
            return src[:room - len(tgt)], tgt
        return src[:half], tgt[:room - half]

    def prompt_and_target(self, j: int) -> tuple[list[int], list[int], str]:
        """Part A ("<tag> source [gMASK]") and target tokens of sample j, and its direction."""
        en, zh = self.pairs[self.pair_index(j)]
        direction = self._direction(j)
        src, tgt = (en, zh) if direction == "en-zh" else (zh, en)
        src, tgt = self.fit(src, tgt, direction)
        return self.fmt.part_a(src, direction), tgt, direction

    def example(self, j: int) -> GLMExample:
        """Sample j unpacked: the j-th pair of the run, alone."""
        if j < 0:
            raise ValueError(f"sample index {j} must be >= 0")
        return self._pair_example(self.pair_index(j), self._direction(j))

    def length(self, j: int) -> int:
        """len(input_ids) of sample j unpacked, without building it."""
        return self._length(self.pair_index(j), self._direction(j))

    def _pair_example(self, pair: int, direction: str) -> GLMExample:
        en, zh = self.pairs[pair]
        src, tgt = (en, zh) if direction == "en-zh" else (zh, en)
        src, tgt = self.fit(src, tgt, direction)
        return self.fmt.example(src, tgt, direction)

    def _length(self, pair: int, direction: str) -> int:
        """len(input_ids) of the pair's example (its end token is a label only)."""
        en, zh = self.pairs[pair]
        src, tgt = self.fit(*((en, zh) if direction == "en-zh" else (zh, en)), direction)
        return len(src) + len(tgt) + self.fmt.overhead(direction) - 1

    # -- packing: rows of pairs per epoch -------------------------------------------------
    def _pack_layout(self, epoch: int) -> list[list[tuple[int, str]]]:
        order = self._perm(epoch)
        if self.direction == "both":
            flips = np.random.default_rng(mix_seed(self.seed, _PACK, epoch, 0)).random(
                order.size) < 0.5
            dirs = np.where(flips, "zh-en", "en-zh")
        else:
            dirs = np.full(order.size, self.direction)
        lengths = [self._length(int(p), str(d)) for p, d in zip(order, dirs)]
        rng = np.random.default_rng(mix_seed(self.seed, _PACK, epoch, 1)) if self.shuffle \
            else None
        rows = best_fit_rows(lengths, self.seq_len, self.pack_window, rng)
        return [[(int(order[i]), str(dirs[i])) for i in row] for row in rows]

    def rows_in_epoch(self, epoch: int) -> int:
        while len(self._epoch_rows) <= epoch:
            self._epoch_rows.append(len(self._rows(len(self._epoch_rows))))
        return self._epoch_rows[epoch]

    def packed_row(self, j: int) -> list[GLMExample]:
        """Sample j packed: the examples of the run's j-th row."""
        if j < 0:
            raise ValueError(f"sample index {j} must be >= 0")
        epoch = 0
        while j >= self.rows_in_epoch(epoch):
            j -= self.rows_in_epoch(epoch)
            epoch += 1
        return [self._pair_example(p, d) for p, d in self._rows(epoch)[j]]

    def get_batch(self, index: int, batch_size: int) -> dict:
        _check_positive("batch_size", batch_size)
        if index < 0:
            raise ValueError(f"index={index} must be >= 0")
        if self.pack:
            rows = [self.packed_row(index * batch_size + r) for r in range(batch_size)]
            return pack(rows, self.seq_len, self.ids.pad)
        examples = [self.example(index * batch_size + r) for r in range(batch_size)]
        return collate(examples, self.seq_len, self.ids.pad)
