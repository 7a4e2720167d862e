"""runners/prepare_data.py: extract the EN/ZH pairs from the machine's zh_CN gettext
catalogues, split them (whole catalogues held out for test), train the sentencepiece
tokenizer on the train pairs, and write packed token shards into data.dir.

    python runners/prepare_data.py --data.dir data
    python runners/prepare_data.py --data.dir data --data.vocab_size 8000 \
        --data.test_catalogs wget,tar,sed,grep --data.seed 0 --force

More catalogues, more pairs: `pip install -e .[data]` (Python packages shipping zh_CN
catalogues) or `apt-get install` translated packages. The output is git-ignored: the
extracted text is rebuilt on each machine, never committed."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from engine.config_cli import Alias, command
from engine.recipe.data.corpus import DEFAULT_TEST_CATALOGS


@dataclass
class PrepareData:
    dir: str = "data"              # output folder (what the other runners' data.dir reads)
    vocab_size: int = 8000         # sentencepiece vocabulary
    tokenizer: str = ""            # encode with this tokenizer.model instead of training one
    #                                (an imported ChatGLM's, so the shards use its ids)
    roots: list[str] = field(default_factory=list)  # folders searched for zh_CN *.mo files
    #                                ([]: system locale folders, vim, Python site-packages)
    # catalogue families held out whole for test (gnulib siblings follow their family)
    test_catalogs: list[str] = field(default_factory=lambda: list(DEFAULT_TEST_CATALOGS))
    dev_fraction: float = 0.02     # share of the remaining English strings for dev
    dev_max: int = 1000            # at most this many dev strings
    min_train: int = 2000          # fail when fewer training pairs are found
    seed: int = 0                  # dev draw and document shuffle seed


_OLD = {"--out": "dir", "--roots": "roots", "--test-catalogs": "test_catalogs",
        "--dev-fraction": "dev_fraction", "--dev-max": "dev_max", "--min-train": "min_train",
        "--vocab-size": "vocab_size", "--tokenizer": "tokenizer", "--seed": "seed"}
COMMAND = command(
    __doc__, {"data": PrepareData},
    flags={"--force": "rebuild even if data.dir already holds a complete preparation"},
    aliases={k: Alias(f"data.{v}") for k, v in _OLD.items()})


def run(config, force: bool = False) -> int:
    from engine.recipe.data.prepare import PrepareConfig, prepare
    d = config.data
    start = time.perf_counter()
    manifest = prepare(PrepareConfig(
        out=d.dir, vocab_size=d.vocab_size, seed=d.seed, test_catalogs=tuple(d.test_catalogs),
        dev_fraction=d.dev_fraction, dev_max=d.dev_max, min_train=d.min_train,
        roots=list(d.roots) or None,
        tokenizer=os.path.abspath(d.tokenizer) if d.tokenizer else ""), force=force)
    for step, seconds in manifest["timings_s"].items():
        print(f"  {step:<18} {seconds:7.2f}")
    print(f"total {time.perf_counter() - start:.1f} s; pairs {manifest['pairs']}")
    return 0


def main(argv=None):
    return COMMAND.main(run, argv)
