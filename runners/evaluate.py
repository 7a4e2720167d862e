"""Evaluate a checkpoint on English -> Chinese translation: KV-cache decoding, sacrebleu
BLEU (tokenize="zh") and chrF, exact match, teacher-forced loss on the whole dev split and
on the evaluated pairs (held-out loss), parameters, size on disk, latency and tokens/s. Writes <out>/eval.json and <out>/eval.md.

    python runners/evaluate.py --checkpoint runs/demo/translate/checkpoint \
        --input data/pairs/test.tsv --data-dir data --out runs/demo/eval

Any TSV of `english<TAB>chinese` lines works as --input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.errors import fail, run_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--checkpoint", required=True, help="checkpoint directory")
    io.add_argument("--input", required=True, help="TSV: english<TAB>chinese per line")
    io.add_argument("--data-dir", default=None,
                    help="prepared data folder, for the dev-split loss (optional)")
    io.add_argument("--tokenizer", default=None,
                    help="tokenizer.model (default: the one saved with the checkpoint)")
    io.add_argument("--out", default=None, help="folder for eval.json / eval.md")
    io.add_argument("--name", default="model", help="row name in the markdown table")
    io.add_argument("--save-hyps", default=None, metavar="FILE",
                    help="write every hypothesis: english<TAB>reference<TAB>hypothesis")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--mode", choices=["greedy", "beam"], default="greedy")
    dec.add_argument("--num-beams", type=int, default=4)
    dec.add_argument("--max-new-tokens", type=int, default=64)
    dec.add_argument("--batch-size", type=int, default=32)
    dec.add_argument("--limit", type=int, default=0, help="first N sentences only (0 = all)")
    dec.add_argument("--latency-samples", type=int, default=16)
    dec.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from engine.train import checkpoint as ckpt_lib
    from engine.recipe.data.corpus import read_tsv
    from engine.recipe.data.datasets import TranslationDataset
    from engine.recipe.evaluate import evaluate, markdown_table, save_hypotheses
    from model import GLM, GLMConfig
    from engine.recipe.data.prompts import TranslationFormat
    from model.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ckpt = ckpt_lib.Checkpoint(args.checkpoint)
        tok_path = args.tokenizer or os.path.join(args.checkpoint, "tokenizer.model")
        tok = load_tokenizer(tok_path)
        ckpt.check_tokenizer(tok.sha256, tok_path)
        pairs = [(en, zh) for en, zh in read_tsv(args.input)]
        if args.limit:
            pairs = pairs[:args.limit]
        cfg = GLMConfig.from_dict(ckpt.meta["config"]["model"])
        model = GLM.build(cfg)
        ckpt_lib.load_model_weights(model, ckpt)
        # native GLM layout, or an imported ChatGLM's causal chat prompt (engine/recipe/data/prompts)
        fmt = TranslationFormat(tok, cfg)
        seq = 96 + max(0, fmt.overhead() - 4)   # the native layout's 96 tokens, same room
        dev = None
        if args.data_dir:
            dev = TranslationDataset(os.path.join(args.data_dir, "shards", "translation_dev"),
                                     tok, seq, seed=0, shuffle=False, fmt=fmt)
        # the evaluated pairs themselves, teacher-forced: a loss on text no run tuned on
        heldout = TranslationDataset(list(zip(tok.encode_batch([e for e, _ in pairs]),
                                              tok.encode_batch([z for _, z in pairs]))),
                                     tok, seq, seed=0, shuffle=False, fmt=fmt)
    except ValueError as e:
        fail(e)
    print(f"evaluate: {len(pairs):,} pairs from {args.input} on {args.checkpoint} "
          f"(step {ckpt.meta['step']}, {model.num_params():,} parameters)", file=sys.stderr,
          flush=True)
    result = evaluate(model, tok, pairs, dev=dev, heldout=heldout, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, mode=args.mode,
                      num_beams=args.num_beams, latency_samples=args.latency_samples,
                      checkpoint_dir=args.checkpoint, progress=True)
    table = markdown_table({args.name: result})
    print(table)
    for ex in result.examples[:5]:
        print(f"  EN  {ex['en']}\n  REF {ex['ref']}\n  HYP {ex['hyp']}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "eval.json"), "w", encoding="utf-8") as f:
            json.dump({"checkpoint": args.checkpoint, "input": args.input,
                       **result.to_dict()}, f, indent=1, ensure_ascii=False)
        with open(os.path.join(args.out, "eval.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        print(f"wrote {args.out}/eval.json and eval.md")
    if args.save_hyps:
        save_hypotheses(args.save_hyps, pairs, result.hypotheses)
        print(f"wrote {len(result.hypotheses):,} hypotheses to {args.save_hyps}")


if __name__ == "__main__":
    run_main(main)
