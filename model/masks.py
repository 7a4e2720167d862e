"""Attention patterns and positions as small integer tensors.

Nothing here builds a dense mask for the model to carry around: a batch is described by
`prefix_lens` [b] (keys before it are visible to every query; 0 means causal) and, for
left-padded generation, `pad_lens` [b]. Attention builds (or, in the Triton kernel,
evaluates) the mask from those on the fly; see `kernels.reference.attention_mask`.

GLM blank infilling (Du et al. 2022) is prefix-LM with 2D positions:
  Part A = the text with each span replaced by one mask token, attended bidirectionally;
  Part B = the spans, each "<sop> span", attended causally, in shuffled order.
  position id       : Part A -> its index; Part B -> the index of its span's mask in A
  block position id : Part A -> 0;         Part B -> 1, 2, ... within its span
The same layout serves translation: "<en> source [gMASK]" is Part A, "<sop> target" Part B.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


IGNORE = -100


@dataclass
class GLMExample:
    """One sequence with everything the model needs besides the weights."""
    input_ids: list[int]
    position_ids: list[int]
    block_position_ids: list[int]
    labels: list[int]          # IGNORE where no loss
    prefix_len: int


def causal_example(tokens: list[int]) -> GLMExample:
    """Plain next-token prediction: inputs tokens[:-1], labels tokens[1:]."""
    n = len(tokens) - 1
    return GLMExample(tokens[:-1], list(range(n)), [0] * n, tokens[1:], 0)


def blank_infilling_example(part_a: list[int], spans: list[tuple[int, list[int]]],
                            sop_id: int, eop_id: int) -> GLMExample:
    """Assemble a GLM sequence.

    part_a: Part A tokens, already containing one mask token per span.
    spans:  (mask_index_in_part_a, span_tokens) in the order Part B should hold them.
    """
    ids = list(part_a)
    pos = list(range(len(part_a)))
    blk = [0] * len(part_a)
    labels = [IGNORE] * len(part_a)
    for mask_index, span in spans:
        ids += [sop_id] + list(span)
        pos += [mask_index] * (len(span) + 1)
        blk += list(range(1, len(span) + 2))
        labels += list(span) + [eop_id]
    return GLMExample(ids, pos, blk, labels, len(part_a))


def corrupt_spans(tokens: list[int], mask_id: int, sop_id: int, eop_id: int,
                  generator: torch.Generator, ratio: float = 0.15,
                  mean_span: float = 3.0) -> GLMExample:
    """GLM span corruption: about `ratio` of the tokens in spans with Poisson(mean_span)
    lengths (at least 1), each replaced by `mask_id` in Part A, spans shuffled in Part B."""
    n = len(tokens)
    budget = max(1, round(ratio * n))
    lengths = []
    while sum(lengths) < budget:
        ln = int(torch.poisson(torch.tensor([mean_span]), generator=generator).item())
        lengths.append(max(1, min(ln, budget - sum(lengths))))
    # spread the spans: choose distinct start slots among the unmasked tokens
    free = n - sum(lengths)
    k = len(lengths)
    if free < k:  # too short to separate spans: one span
        lengths, k = [budget], 1
        free = n - budget
    cuts = sorted(torch.randperm(free + 1, generator=generator)[:k].tolist())
    spans, part_a, cursor, taken = [], [], 0, 0
    for cut, ln in zip(cuts, lengths):
        start = cut + taken
        part_a += tokens[cursor:start] + [mask_id]
        spans.append((len(part_a) - 1, tokens[start:start + ln]))
        cursor = start + ln
        taken += ln
    part_a += tokens[cursor:]
    order = torch.randperm(len(spans), generator=generator).tolist()
    return blank_infilling_example(part_a, [spans[i] for i in order], sop_id, eop_id)


def gmask_example(tokens: list[int], split: int, gmask_id: int, sop_id: int,
                  eop_id: int) -> GLMExample:
    """[gMASK] objective: Part A = tokens[:split] + [gMASK], Part B generates the rest."""
    part_a = list(tokens[:split]) + [gmask_id]
    return blank_infilling_example(part_a, [(len(part_a) - 1, list(tokens[split:]))],
                                   sop_id, eop_id)


def collate(examples: list[GLMExample], seq_len: int, pad_id: int) -> dict:
    """Right-pad to seq_len. Right padding needs no pad_lens: pads sit after every real
    token and the causal part of the mask already hides them; their labels are IGNORE."""
    b = len(examples)
    out = {
        "input_ids": torch.full((b, seq_len), pad_id, dtype=torch.long),
        "position_ids": torch.zeros((b, seq_len), dtype=torch.long),
        "block_position_ids": torch.zeros((b, seq_len), dtype=torch.long),
        "labels": torch.full((b, seq_len), IGNORE, dtype=torch.long),
        "prefix_lens": torch.zeros(b, dtype=torch.long),
    }
    for r, ex in enumerate(examples):
        n = len(ex.input_ids)
        if n > seq_len:
            raise ValueError(f"example of length {n} exceeds seq_len={seq_len}")
        out["input_ids"][r, :n] = torch.tensor(ex.input_ids)
        out["position_ids"][r, :n] = torch.tensor(ex.position_ids)
        # pads continue the positions so rotary angles stay in range
        out["position_ids"][r, n:] = torch.arange(n, seq_len)
        out["block_position_ids"][r, :n] = torch.tensor(ex.block_position_ids)
        out["labels"][r, :n] = torch.tensor(ex.labels)
        out["prefix_lens"][r] = ex.prefix_len
    return out


def pack(rows: list[list[GLMExample]], seq_len: int, pad_id: int) -> dict:
    """Several examples per row, each with its own prefix-LM mask and positions, each
    attending only to itself (document masking); the row's tail is padding.

    Besides collate's keys (same shapes) the batch carries, per token [b, seq_len]:
      doc_starts   absolute index of the first token of the token's example
      prefix_lens  absolute end of that example's bidirectional prefix (doc start + its
                   prefix_len), replacing collate's per-row [b]
    Pads form one causal document of their own, so every query sees at least itself.
    A packed example computes exactly what it would alone in a row: its keys, its
    positions, its labels (kernels.reference.attention_mask)."""
    b = len(rows)
    out = {
        "input_ids": torch.full((b, seq_len), pad_id, dtype=torch.long),
        "position_ids": torch.zeros((b, seq_len), dtype=torch.long),
        "block_position_ids": torch.zeros((b, seq_len), dtype=torch.long),
        "labels": torch.full((b, seq_len), IGNORE, dtype=torch.long),
        "prefix_lens": torch.zeros((b, seq_len), dtype=torch.long),
        "doc_starts": torch.zeros((b, seq_len), dtype=torch.long),
    }
    for r, examples in enumerate(rows):
        at = 0
        for ex in examples:
            n = len(ex.input_ids)
            if at + n > seq_len:
                raise ValueError(f"row {r}: examples of {at + n} tokens exceed "
                                 f"seq_len={seq_len}")
            sl = slice(at, at + n)
            out["input_ids"][r, sl] = torch.tensor(ex.input_ids)
            out["position_ids"][r, sl] = torch.tensor(ex.position_ids)
            out["block_position_ids"][r, sl] = torch.tensor(ex.block_position_ids)
            out["labels"][r, sl] = torch.tensor(ex.labels)
            out["prefix_lens"][r, sl] = at + ex.prefix_len
            out["doc_starts"][r, sl] = at
            at += n
        # pads: one causal document; positions restart so rotary angles stay in range
        out["position_ids"][r, at:] = torch.arange(seq_len - at)
        out["prefix_lens"][r, at:] = at
        out["doc_starts"][r, at:] = at
    return out

