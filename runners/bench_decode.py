"""Decode latency of several checkpoints, side by side in one run: batch-1 greedy decoding
of a fixed number of new tokens per prompt (the end token is never accepted, so every
model does the same work whatever it would have said), the models interleaved round by
round so that load on a shared machine falls on all of them alike. Prints the median ms
per generated token and each model's ratio to the first (e.g. student / teacher).

    python runners/bench_decode.py runs/demo/translate/checkpoint \
        runs/demo/student/kd/checkpoint --names teacher student
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import fail, run_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories; ratios are to the first")
    p.add_argument("--names", nargs="*", help="one label per checkpoint")
    p.add_argument("--data-dir", default="data", help="prompts: the held-out test pairs")
    p.add_argument("--prompts", type=int, default=8, help="English sources per round")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def decode_ms_per_token(model, prompts: list[list[int]], new_tokens: int, pad_id: int,
                        sop_id: int) -> float:
    """One round: each prompt alone (batch 1), exactly new_tokens greedy steps."""
    from model.generate import generate
    # the end id is the last padded vocabulary row, and decoding is limited to the rows
    # below it: it can never be chosen, so every prompt runs all new_tokens steps
    end = model.config.padded_vocab_size - 1
    t0, n = time.perf_counter(), 0
    for p in prompts:
        out = generate(model, [p], max_new_tokens=new_tokens, eos_id=end, pad_id=pad_id,
                       sop_id=sop_id, mode="greedy", vocab_size=end)
        n += len(out[0])
    if n != new_tokens * len(prompts):
        raise RuntimeError(f"decoded {n} tokens, expected {new_tokens * len(prompts)}")
    return 1000 * (time.perf_counter() - t0) / n


def bench(models: dict, prompts, new_tokens: int, rounds: int, pad_id: int, sop_id: int):
    """{name: [ms/token per round]}, the models taking turns within every round (after
    one untimed warm-up round each)."""
    for m in models.values():
        decode_ms_per_token(m, prompts[:1], 2, pad_id, sop_id)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            times[name].append(decode_ms_per_token(m, prompts, new_tokens, pad_id, sop_id))
    return times


def table(models: dict, times: dict) -> str:
    first = statistics.median(next(iter(times.values())))
    lines = ["| model | params | layers | ms/token (median) | min | max | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, ts in times.items():
        med, m = statistics.median(ts), models[name]
        lines.append(f"| {name} | {m.num_params():,} | {m.config.num_layers} | {med:.2f} | "
                     f"{min(ts):.2f} | {max(ts):.2f} | {med / first:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from engine.recipe.compress.export import load_glm
    from engine.recipe.data.corpus import read_tsv
    from engine.recipe.evaluate import prompt_ids, translation_format
    from model.tokenizer import load_tokenizer
    from pathlib import Path

    torch.set_num_threads(args.threads)
    names = args.names or [os.path.basename(os.path.dirname(os.path.abspath(c)))
                           for c in args.checkpoints]
    try:
        if len(names) != len(args.checkpoints) or len(set(names)) != len(names):
            raise ValueError("--names needs one distinct label per checkpoint")
        for k in ("prompts", "new_tokens", "rounds"):
            if getattr(args, k) <= 0:
                raise ValueError(f"--{k.replace('_', '-')} must be positive")
        tok = load_tokenizer(os.path.join(args.data_dir, "tokenizer", "tokenizer.model"))
        pairs = read_tsv(Path(args.data_dir) / "pairs" / "test.tsv")[:args.prompts]
        if not pairs:
            raise ValueError(f"no test pairs in {args.data_dir}/pairs/test.tsv")
        models = {}
        for name, path in zip(names, args.checkpoints):
            model, ckpt = load_glm(path)
            ckpt.check_tokenizer(tok.sha256, os.path.join(args.data_dir, "tokenizer"))
            models[name] = model.eval()
    except ValueError as e:
        fail(e)
    # the first model's prompt layout (native, or an imported ChatGLM's chat prompt)
    fmt = translation_format(next(iter(models.values())), tok)
    prompts = [prompt_ids(tok, en, 96, fmt) for en, _ in pairs]
    with torch.no_grad():
        times = bench(models, prompts, args.new_tokens, args.rounds, tok.pad_id, tok.sop_id)
    print(f"batch-1 greedy decode, {len(prompts)} prompts x {args.new_tokens} new tokens, "
          f"{args.rounds} interleaved rounds, {args.threads} thread(s)")
    print(table(models, times))


if __name__ == "__main__":
    run_main(main)
