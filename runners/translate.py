"""Translate English to Chinese with any checkpoint: one sentence a line, Chinese out.

    python runners/translate.py --checkpoint runs/demo/translate/checkpoint "File not found"
    python runners/translate.py --checkpoint runs/demo/translate --input en.txt > zh.txt
    echo "Permission denied" | python runners/translate.py --checkpoint CKPT --mode beam
    python runners/translate.py --checkpoint CKPT --mode sample --top-p 0.9 --temperature 0.7
    python runners/translate.py --checkpoint CKPT --interactive

The checkpoint is a native one (a run directory works: its newest save is used) or a
ChatGLM2/3-format directory (config.json + safetensors + tokenizer.model). Decoding runs
in batches on the KV cache; the Chinese goes to stdout, load and speed notes to stderr.
"""
from __future__ import annotations

import argparse

from engine.errors import fail, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("sentences", nargs="*", help="English sentences (default: --input or "
                    "stdin, one a line)")
    io.add_argument("--checkpoint", required=True,
                    help="native checkpoint or run directory, or a ChatGLM-format directory")
    io.add_argument("--input", default=None, help="file of English sentences, one a line "
                    "('-': stdin)")
    io.add_argument("--tokenizer", default=None,
                    help="tokenizer.model (default: the one inside the checkpoint)")
    io.add_argument("--tsv", action="store_true",
                    help="print english<TAB>chinese instead of the Chinese alone")
    io.add_argument("--interactive", action="store_true",
                    help="prompt for one sentence at a time (empty line or Ctrl-D ends)")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--mode", choices=["greedy", "beam", "sample"], default="greedy",
                     help="greedy argmax, beam search, or sampling")
    dec.add_argument("--num-beams", type=int, default=4, help="beam width (--mode beam)")
    dec.add_argument("--length-penalty", type=float, default=1.0,
                     help="beam score = log p / length ** this (--mode beam)")
    dec.add_argument("--temperature", type=float, default=1.0,
                     help="divide the logits by this before sampling (--mode sample)")
    dec.add_argument("--top-k", type=int, default=0,
                     help="sample among the k most likely tokens only (0: all)")
    dec.add_argument("--top-p", type=float, default=1.0,
                     help="sample from the smallest set holding this much probability")
    dec.add_argument("--seed", type=int, default=None,
                     help="sampling seed (default: a different draw every run)")
    dec.add_argument("--max-new-tokens", type=int, default=64,
                     help="most tokens generated per sentence")
    dec.add_argument("--batch-size", type=int, default=32, help="sentences decoded at once")
    run = p.add_argument_group("machine")
    run.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    run.add_argument("--threads", type=int, default=0,
                     help="torch intra-op threads (0: torch's default)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from engine.recipe.translate import run
    from model.generate import GenerationConfig
    try:
        gen = GenerationConfig(args.mode, args.max_new_tokens, args.temperature, args.top_k,
                               args.top_p, args.num_beams, args.length_penalty, args.seed)
        run(args.checkpoint, args.sentences, args.input, args.interactive, gen,
            args.batch_size, args.tsv, args.tokenizer, args.device, args.threads)
    except ValueError as e:
        fail(e)


if __name__ == "__main__":
    run_main(main)
