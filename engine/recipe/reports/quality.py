"""Quality, size and speed of one checkpoint, the same way for every row of every table:
engine.recipe.evaluate for English -> Chinese (BLEU tokenize="zh", chrF, exact match, latency,
size on disk), plus Chinese -> English BLEU (the D_d task; tokenize="13a")."""
from __future__ import annotations

import torch
from sacrebleu.metrics import BLEU

from engine.recipe.compress.export import load_glm
from engine.recipe.data.corpus import read_tsv
from engine.recipe.evaluate import evaluate, translation_format
from model.generate import generate
from model.utf8_constraint import Utf8Constraint
from model.tokenizer import load_tokenizer


@torch.no_grad()
def zh_en_bleu(model, tok, pairs, max_new_tokens: int, batch_size: int = 32,
               max_source: int = 96) -> float:
    hyps = []
    fmt = translation_format(model, tok)   # native Part A, or an imported chat prompt
    for i in range(0, len(pairs), batch_size):
        prompts = [fmt.prompt(tok.encode(zh)[:max_source], "zh-en")
                   for _, zh in pairs[i:i + batch_size]]
        # vocab_size: never emit the padded rows past the tokenizer's pieces (no text)
        out = generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=fmt.stop_ids,
                       pad_id=tok.pad_id, sop_id=tok.sop_id, mode="greedy",
                       vocab_size=tok.vocab_size,
                       utf8=Utf8Constraint.for_tokenizer(tok))  # no U+FFFD
        hyps += [tok.decode(o).strip() for o in out]
    return BLEU(tokenize="13a").corpus_score(hyps, [[en for en, _ in pairs]]).score


def measure(checkpoint: str, test_tsv: str, tokenizer_path: str, n: int,
            max_new_tokens: int, latency_samples: int) -> dict:
    from pathlib import Path
    model, _ = load_glm(checkpoint)
    model.eval()
    tok = load_tokenizer(tokenizer_path)
    pairs = read_tsv(Path(test_tsv))[:n]
    r = evaluate(model, tok, pairs, max_new_tokens=max_new_tokens,
                 latency_samples=latency_samples, checkpoint_dir=checkpoint, n_examples=2)
    return {"params": r.params, "disk_mb": r.disk_mb, "latency_ms": r.latency_ms,
            "latency_ms_per_token": r.latency_ms_per_token,
            "bleu": r.bleu, "chrf": r.chrf, "exact_match": r.exact_match,
            "bleu_zh_en": zh_en_bleu(model, tok, pairs, max_new_tokens),
            "examples": r.examples}
