"""Decode latency of several models side by side (runners/bench_decode.py): batch-1
greedy decoding of a fixed number of new tokens per prompt, the models interleaved round
by round so that load on a shared machine falls on all of them alike."""
from __future__ import annotations

import statistics
import time


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
