"""Translation evaluation: KV-cache decoding EN -> ZH, sacrebleu BLEU (tokenize="zh") and
chrF, exact match, teacher-forced loss on the dev split and on the evaluated pairs, model
size and speed. Used by runners/evaluate.py and
by the compression / fine-tuning reports, so every table is computed the same way."""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from sacrebleu.metrics import BLEU, CHRF

from engine.recipe.data.prompts import TranslationFormat
from model.generate import generate
from model.utf8_constraint import Utf8Constraint
from model.masks import collate


@dataclass
class EvalResult:
    n_sentences: int
    bleu: float
    chrf: float
    exact_match: float
    dev_loss: float | None     # every dev example once, mean per target token
    dev_ppl: float | None
    heldout_loss: float | None  # the same on the evaluated pairs themselves
    params: int
    disk_mb: float | None
    latency_ms: float          # one sentence at a time, greedy, mean
    latency_ms_per_token: float  # the same runs' time / generated tokens (length-free)
    decode_tokens_per_s: float  # batched decoding throughput
    examples: list
    # every hypothesis in input order: --save-hyps writes them; eval.json keeps examples
    hypotheses: list = field(default_factory=list, repr=False)

    def to_dict(self):
        d = asdict(self)
        d.pop("hypotheses")
        return d


def prompt_ids(tok, english: str, max_source: int, fmt=None) -> list[int]:
    """The decoding prompt of `english`: by default the native Part A, <en> source [gMASK]
    (then <sop> starts Part B); with fmt (TranslationFormat) that model's own prompt."""
    if fmt is None:
        return [tok.en_id] + tok.encode(english)[:max_source] + [tok.gmask_id]
    return fmt.prompt(tok.encode(english)[:max_source], "en-zh")


def translation_format(model, tok) -> TranslationFormat:
    """The layout `model` was trained on: native GLM, or an imported ChatGLM's prompt."""
    return TranslationFormat(tok, model.config)


def translate(model, tok, sources: list[str], *, batch_size=32, max_new_tokens=64,
              max_source=96, mode="greedy", num_beams=4, progress=None,
              **sampling) -> tuple[list[str], float, int]:
    """Returns (hypotheses, seconds, generated token count). sampling: generate()'s
    temperature / top_k / top_p / seed / length_penalty; progress: an engine.progress.
    Progress, advanced by each batch's sentences."""
    hyps, seconds, n_tokens = [], 0.0, 0
    fmt = translation_format(model, tok)
    utf8 = Utf8Constraint.for_tokenizer(tok)
    for i in range(0, len(sources), batch_size):
        prompts = [prompt_ids(tok, s, max_source, fmt) for s in sources[i:i + batch_size]]
        t0 = time.perf_counter()
        out = generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=fmt.stop_ids,
                       pad_id=tok.pad_id, sop_id=tok.sop_id, mode=mode, num_beams=num_beams,
                       vocab_size=tok.vocab_size, utf8=utf8, **sampling)
        seconds += time.perf_counter() - t0
        n_tokens += sum(len(o) for o in out)
        hyps += [tok.decode(o).strip() for o in out]
        if progress is not None:
            progress.update(len(prompts))
    return hyps, seconds, n_tokens


def measure_latency(model, tok, sources: list[str], max_new_tokens=64,
                    max_source=96) -> tuple[float, float]:
    """Batch 1, greedy: (mean wall ms per sentence -- what one user waits --, ms per
    generated token over the same runs). Compare models by the second: a model that
    stops early (or rambles to max_new_tokens) changes the first without being faster."""
    times, tokens = [], 0
    fmt = translation_format(model, tok)
    for s in sources:
        t0 = time.perf_counter()
        out = generate(model, [prompt_ids(tok, s, max_source, fmt)],
                       max_new_tokens=max_new_tokens, eos_id=fmt.stop_ids, pad_id=tok.pad_id,
                       sop_id=tok.sop_id, mode="greedy",
                       vocab_size=tok.vocab_size,
                       utf8=Utf8Constraint.for_tokenizer(tok))
        times.append(time.perf_counter() - t0)
        tokens += max(len(out[0]), 1)    # the end token is generated too
    if not times:
        return float("nan"), float("nan")
    return 1000 * statistics.mean(times), 1000 * sum(times) / tokens


def score(hyps: list[str], refs: list[str]) -> dict:
    # force=True only turns off sacrebleu's "forgot to detokenize" check (hypotheses ending
    # in " ."), which fires on our decoded Chinese: the zh tokenizer splits every character and
    # punctuation mark anyway, so "猫 ." and "猫." score the same and the warning is noise.
    bleu = BLEU(tokenize="zh", force=True).corpus_score(hyps, [refs]).score
    chrf = CHRF().corpus_score(hyps, [refs]).score
    em = 100.0 * sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / max(len(refs), 1)
    return {"bleu": bleu, "chrf": chrf, "exact_match": em}


@torch.no_grad()
def mean_token_loss(model, batches) -> float:
    """Mean loss per target token (labels != -100) of `model` over collated batches."""
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        losses = model(b["input_ids"], position_ids=b["position_ids"],
                       block_position_ids=b["block_position_ids"],
                       prefix_lens=b["prefix_lens"], doc_starts=b.get("doc_starts"),
                       labels=b["labels"])
        total += losses.sum().item()
        count += int((b["labels"] != -100).sum())
    return total / max(count, 1)


def dev_loss(model, dataset, batches: int, batch_size: int) -> float:
    """The first `batches` batches of `dataset` (wrapping around a small one)."""
    return mean_token_loss(model, (dataset.get_batch(i, batch_size) for i in range(batches)))


def full_loss(model, dataset, batch_size: int = 32) -> float:
    """Every example of `dataset` exactly once (in order, the last batch partial), so two
    models are compared on the same tokens."""
    n = len(dataset)
    return mean_token_loss(model, (
        collate([dataset.example(j) for j in range(start, min(start + batch_size, n))],
                dataset.seq_len, dataset.ids.pad) for start in range(0, n, batch_size)))


def eval_seq_len(fmt: TranslationFormat) -> int:
    """Row length for teacher-forced evaluation: the native layout's 96 tokens, and the
    same room for the pair under a longer (imported chat) prompt."""
    return 96 + max(0, fmt.overhead() - 4)


def pairs_dataset(tok, fmt: TranslationFormat, pairs: list[tuple[str, str]]):
    """The evaluated pairs themselves, one per row in order, for a teacher-forced loss on
    text no run tuned on (the held-out loss)."""
    from engine.recipe.data.datasets import TranslationDataset
    return TranslationDataset(list(zip(tok.encode_batch([e for e, _ in pairs]),
                                       tok.encode_batch([z for _, z in pairs]))),
                              tok, eval_seq_len(fmt), seed=0, shuffle=False, fmt=fmt)


def dir_size_mb(path: str, sub: str = "model") -> float:
    root = os.path.join(path, sub)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(root)
               for f in fs) / 2 ** 20


def evaluate(model, tok, pairs: list[tuple[str, str]], *, dev=None, heldout=None,
             batch_size=32, max_new_tokens=64, mode="greedy", num_beams=4,
             latency_samples=16, checkpoint_dir=None, n_examples=8,
             progress: bool = False) -> EvalResult:
    """progress: a line on stderr at most every 10 s while decoding, and one per phase."""
    from engine.progress import Progress, format_duration
    model.eval()
    sources = [p[0] for p in pairs]
    refs = [p[1] for p in pairs]
    bar = Progress(len(sources), "evaluate: translate", "sentences") if progress else None
    hyps, seconds, n_tokens = translate(model, tok, sources, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, mode=mode,
                                        num_beams=num_beams, progress=bar)
    if bar is not None:
        bar.done()
    s = score(hyps, refs)

    def phase(what, fn):
        t0 = time.monotonic()
        out = fn()
        if progress:
            print(f"evaluate: {what} | {format_duration(time.monotonic() - t0)}",
                  file=sys.stderr, flush=True)
        return out
    dl = phase(f"dev loss over {len(dev):,} examples", lambda: full_loss(
        model, dev, batch_size)) if dev is not None else None
    hl = phase(f"held-out loss over {len(heldout):,} pairs", lambda: full_loss(
        model, heldout, batch_size)) if heldout is not None else None
    ms_sent, ms_token = phase(
        f"latency over {min(latency_samples, len(sources))} sentences, one at a time",
        lambda: measure_latency(model, tok, sources[:latency_samples], max_new_tokens))
    return EvalResult(
        n_sentences=len(pairs), bleu=s["bleu"], chrf=s["chrf"], exact_match=s["exact_match"],
        dev_loss=dl, dev_ppl=math.exp(min(dl, 50)) if dl is not None else None,
        heldout_loss=hl,
        params=model.num_params(),
        disk_mb=dir_size_mb(checkpoint_dir) if checkpoint_dir else None,
        latency_ms=ms_sent, latency_ms_per_token=ms_token,
        decode_tokens_per_s=n_tokens / max(seconds, 1e-9),
        examples=[{"en": a, "ref": r, "hyp": h}
                  for a, r, h in list(zip(sources, refs, hyps))[:n_examples]],
        hypotheses=hyps)


def save_hypotheses(path: str, pairs: list[tuple[str, str]], hyps: list[str]):
    """english<TAB>reference<TAB>hypothesis, one line per evaluated pair, in input order."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    clean = lambda t: " ".join(t.split())  # noqa: E731 - a tab or newline would split a row
    with open(path, "w", encoding="utf-8") as f:
        for (en, ref), hyp in zip(pairs, hyps):
            f.write(f"{clean(en)}\t{clean(ref)}\t{clean(hyp)}\n")


def markdown_table(rows: dict[str, EvalResult]) -> str:
    head = ("| model | params | disk MB | dev loss | ppl | held-out loss | BLEU | chrF | "
            "exact % | latency ms/sent | ms/token | decode tok/s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for name, r in rows.items():
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {name} | {r.params:,} | {fmt(r.disk_mb, '.1f')} | "
                     f"{fmt(r.dev_loss, '.3f')} | {fmt(r.dev_ppl, '.1f')} | "
                     f"{fmt(r.heldout_loss, '.3f')} | {r.bleu:.2f} | "
                     f"{r.chrf:.2f} | {r.exact_match:.1f} | {r.latency_ms:.1f} | "
                     f"{r.latency_ms_per_token:.2f} | "
                     f"{r.decode_tokens_per_s:,.0f} |")
    return "\n".join(lines)
