"""From catalogues to train / dev / test pair lists, and the pairs TSV format.

Test holds out whole catalogue families (default wget, tar, sed, grep and their gnulib
siblings), so the test strings come from programs the model never saw. Dev is a small
seeded share of the rest, chosen by English string so one English never sits on both
sides. Any pair whose English also occurs in test is dropped from train and dev: the
same message translated twice must not leak the answer.
"""
from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.recipe.data.catalogs import Pair, catalog_group, default_roots, extract_pairs, find_catalogs
from engine.recipe.data.io import write_text

DEFAULT_TEST_CATALOGS = ("wget", "tar", "sed", "grep")

MORE_DATA_HINT = ("get more with `pip install -e .[data]` (Python packages that ship zh_CN "
                  "catalogues: jupyterlab-language-pack-zh-cn, sphinx, django) or "
                  "`apt-get install` of translated packages (language-pack-zh-hans, "
                  "vim, git, postgresql, ...)")


@dataclass
class SplitConfig:
    test_catalogs: tuple[str, ...] = DEFAULT_TEST_CATALOGS
    dev_fraction: float = 0.02
    dev_max: int = 1000
    seed: int = 0
    min_train: int = 2000      # fewer than this is not a corpus worth training on

    def __post_init__(self):
        if isinstance(self.test_catalogs, str):
            self.test_catalogs = tuple(s for s in self.test_catalogs.split(",") if s)
        self.test_catalogs = tuple(catalog_group(s.strip()) for s in self.test_catalogs)
        if not self.test_catalogs:
            raise ValueError("test_catalogs is empty: name at least one catalogue to hold out")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError(f"dev_fraction={self.dev_fraction} must be in [0, 1)")
        if self.dev_max < 0:
            raise ValueError(f"dev_max={self.dev_max} must be >= 0")
        if self.min_train < 1:
            raise ValueError(f"min_train={self.min_train} must be >= 1")


@dataclass
class Splits:
    train: list[Pair] = field(default_factory=list)
    dev: list[Pair] = field(default_factory=list)
    test: list[Pair] = field(default_factory=list)
    leaked: int = 0            # train/dev pairs dropped because their English is in test

    def items(self):
        return (("train", self.train), ("dev", self.dev), ("test", self.test))


def split_pairs(pairs: list[Pair], config: SplitConfig) -> Splits:
    held_out = set(config.test_catalogs)
    out = Splits()
    rest = []
    for p in pairs:
        # a pair shared with a held-out catalogue is a test pair
        (out.test if p.groups & held_out else rest).append(p)
    test_english = {p.english for p in out.test}
    kept = [p for p in rest if p.english not in test_english]
    out.leaked = len(rest) - len(kept)
    # dev by distinct English, sorted first so the draw does not depend on file order
    english = sorted({p.english for p in kept})
    n_dev = min(config.dev_max, round(config.dev_fraction * len(english)))
    dev_english = set(random.Random(config.seed).sample(english, n_dev))
    for p in kept:
        (out.dev if p.english in dev_english else out.train).append(p)
    return out


def split_stats(splits: Splits, per_catalog: dict[str, int] | None = None) -> dict:
    """Counts per split and per (primary) source catalogue, for stats.json and the log."""
    stats = {"splits": {name: len(ps) for name, ps in splits.items()},
             "leaked_removed": splits.leaked,
             "per_source": {}}
    for name, ps in splits.items():
        for src, n in Counter(p.source for p in ps).items():
            stats["per_source"].setdefault(src, {"train": 0, "dev": 0, "test": 0})[name] = n
    stats["per_source"] = dict(sorted(stats["per_source"].items()))
    if per_catalog is not None:
        stats["extracted_per_catalog"] = dict(sorted(per_catalog.items()))
    return stats


def format_stats(stats: dict) -> str:
    lines = [f"{'source':<28}{'train':>8}{'dev':>6}{'test':>7}"]
    for src, c in stats["per_source"].items():
        lines.append(f"{src:<28}{c['train']:>8}{c['dev']:>6}{c['test']:>7}")
    s = stats["splits"]
    lines.append(f"{'TOTAL':<28}{s['train']:>8}{s['dev']:>6}{s['test']:>7}"
                 f"   ({stats['leaked_removed']} train/dev pairs dropped: English in test)")
    return "\n".join(lines)


def load_corpus(config: SplitConfig, roots: list[str | os.PathLike] | None = None):
    """Find, extract, split. Returns (splits, stats). Raises a one-line ValueError naming
    the folders searched when they hold too little data to train on."""
    roots = default_roots() if roots is None else [Path(r) for r in roots]
    catalogs = find_catalogs(roots)
    pairs, per_catalog = extract_pairs(catalogs)
    splits = split_pairs(pairs, config)
    where = ", ".join(str(r) for r in roots) or "(no folders)"
    if len(splits.train) < config.min_train:
        raise ValueError(
            f"only {len(splits.train)} training pairs (need >= {config.min_train}) from "
            f"{len(catalogs)} zh_CN catalogue(s) found under {where}; {MORE_DATA_HINT}")
    if not splits.test:
        raise ValueError(f"no pairs from the held-out catalogues {','.join(config.test_catalogs)}"
                         f" under {where}: pick test catalogues that exist (--test-catalogs)")
    return splits, split_stats(splits, per_catalog)


# ---- the pairs TSV: one "english<TAB>chinese" per line --------------------------------
def write_tsv(path: str | os.PathLike, pairs) -> None:
    lines = []
    for p in pairs:
        en, zh = (p.english, p.chinese) if isinstance(p, Pair) else p
        if "\t" in en + zh or "\n" in en + zh:
            raise ValueError(f"{path}: pair {en!r} contains a tab or newline")
        lines.append(f"{en}\t{zh}\n")
    write_text(path, "".join(lines))


def read_tsv(path: str | os.PathLike) -> list[tuple[str, str]]:
    """[(english, chinese)]; a malformed line or an empty file is a one-line ValueError
    naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: pairs file not found")
    pairs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8") from None
            if "\t" not in line:
                raise ValueError(f"{path}:{lineno}: expected 'english<TAB>chinese', "
                                 "found no tab")
            en, zh = line.split("\t", 1)
            if "\t" in zh:
                raise ValueError(f"{path}:{lineno}: expected 2 tab-separated fields, found "
                                 f"{line.count(chr(9)) + 1}")
            if not en.strip() or not zh.strip():
                side = "english" if not en.strip() else "chinese"
                raise ValueError(f"{path}:{lineno}: empty {side} side")
            pairs.append((en, zh))
    if not pairs:
        raise ValueError(f"{path}: empty pairs file")
    return pairs
