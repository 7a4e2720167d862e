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

from engine.errors import fail, run_main
from engine.recipe.decode_bench import bench, table


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
