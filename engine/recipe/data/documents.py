"""Token documents for the pretraining shards, built from tokenized pairs.

Each pair gives three documents, every one opened by a language tag and closed by <eop>:
    <en> english <eop>
    <zh> chinese <eop>
    <en> english <zh> chinese <eop>      (or <zh> chinese <en> english <eop>, 50/50)
The closing <eop> is what tells a bilingual document apart from an English document
that happens to be packed next to a Chinese one; it is also the token that ends
generation, so a translation prompt "<en> source [gMASK] <sop>" learns to stop where a
document would end. Documents are shuffled (seeded) so that the three documents of one
pair do not sit side by side in the shard.
"""
from __future__ import annotations

import random

from model.tokenizer import SpecialIds


def pretrain_documents(pairs: list[tuple[list[int], list[int]]], ids: SpecialIds,
                       seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    docs = []
    for en, zh in pairs:
        en, zh = list(en), list(zh)
        docs.append([ids.en] + en + [ids.eop])
        docs.append([ids.zh] + zh + [ids.eop])
        if rng.random() < 0.5:
            docs.append([ids.en] + en + [ids.zh] + zh + [ids.eop])
        else:
            docs.append([ids.zh] + zh + [ids.en] + en + [ids.eop])
    rng.shuffle(docs)
    return docs


def causal_documents(pairs: list[tuple[list[int], list[int]]], head: list[int],
                     newline: list[int], eos: int, seed: int = 0) -> list[list[int]]:
    """The same three documents per pair for a ChatGLM tokenizer, which has no language
    tags: each opens with ChatGLM's own prefix `head` ([gMASK] sop) and ends with </s>;
    the bilingual one joins its halves with a newline."""
    rng = random.Random(seed)
    docs = []
    for en, zh in pairs:
        en, zh = list(en), list(zh)
        docs.append(head + en + [eos])
        docs.append(head + zh + [eos])
        first, second = (en, zh) if rng.random() < 0.5 else (zh, en)
        docs.append(head + first + newline + second + [eos])
    rng.shuffle(docs)
    return docs
