"""Prepare the EN/ZH data: extract pairs from the machine's zh_CN gettext catalogues,
split them (whole catalogues held out for test), train the sentencepiece tokenizer on
the train pairs, and write packed token shards.

    python runners/prepare_data.py --out data
    python runners/prepare_data.py --out data --vocab-size 8000 \
        --test-catalogs wget,tar,sed,grep --seed 0 --force

More catalogues, more pairs: `pip install -e .[data]` (Python packages shipping zh_CN
catalogues) or `apt-get install` translated packages. The output is git-ignored: the
extracted text is rebuilt on each machine, never committed.
"""
from __future__ import annotations

import argparse
import os
import time

from engine.recipe.data.prepare import PrepareConfig, prepare
from engine.errors import fail, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("output")
    io.add_argument("--out", default="data", help="output folder (default: data)")
    io.add_argument("--force", action="store_true",
                    help="rebuild even if --out already holds a complete preparation")
    src = p.add_argument_group("corpus")
    src.add_argument("--roots", default=None,
                     help="comma-separated folders to search for zh_CN *.mo files "
                          "(default: system locale folders, vim, Python site-packages)")
    src.add_argument("--test-catalogs", default="wget,tar,sed,grep",
                     help="catalogue families held out whole for test (gnulib siblings "
                          "follow their family)")
    src.add_argument("--dev-fraction", type=float, default=0.02,
                     help="share of the remaining English strings for dev")
    src.add_argument("--dev-max", type=int, default=1000, help="at most this many dev strings")
    src.add_argument("--min-train", type=int, default=2000,
                     help="fail when fewer training pairs are found")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary")
    tok.add_argument("--tokenizer", default="",
                     help="encode with this tokenizer.model instead of training one (an "
                          "imported ChatGLM checkpoint's, so the shards use its ids)")
    p.add_argument("--seed", type=int, default=0, help="dev draw and document shuffle seed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        config = PrepareConfig(
            out=args.out, vocab_size=args.vocab_size, seed=args.seed,
            test_catalogs=tuple(s for s in args.test_catalogs.split(",") if s),
            dev_fraction=args.dev_fraction, dev_max=args.dev_max, min_train=args.min_train,
            roots=args.roots.split(",") if args.roots else None,
            tokenizer=os.path.abspath(args.tokenizer) if args.tokenizer else "")
        manifest = prepare(config, force=args.force)
    except ValueError as e:
        fail(e)
    for step, seconds in manifest["timings_s"].items():
        print(f"  {step:<18} {seconds:7.2f}")
    print(f"total {time.perf_counter() - start:.1f} s; pairs {manifest['pairs']}")
    return 0


if __name__ == "__main__":
    run_main(main)
