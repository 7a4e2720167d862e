"""The whole data preparation: catalogues -> pairs -> tokenizer -> token shards.

Output folder (git-ignored; never commit extracted text):
    pairs/{train,dev,test}.tsv        english<TAB>chinese
    stats.json                        pair counts per source catalogue and split
    tokenizer/tokenizer.model         trained on the train pairs only
    shards/pretrain_{train,dev}.*     packed documents (see documents.py)
    shards/translation_{train,dev,test}.*   records (en, zh)
    manifest.json                     settings, tokenizer sha256, files, timings: written
                                      last; its presence means the folder is complete

Everything is built in a sibling temp folder and swapped in at the end, so an existing
output folder is either reused whole, replaced whole (force), or left as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.recipe.data.corpus import (DEFAULT_TEST_CATALOGS, SplitConfig, format_stats, load_corpus,
                                write_tsv)
from engine.recipe.data.documents import causal_documents, pretrain_documents
from engine.recipe.data.io import write_json
from engine.recipe.data.shards import write_shard
from model.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "dev", "test")
PRETRAIN_SPLITS = ("train", "dev")   # test pairs never reach pretraining


@dataclass
class PrepareConfig:
    out: str = "data"
    vocab_size: int = 8000
    test_catalogs: tuple[str, ...] = DEFAULT_TEST_CATALOGS
    seed: int = 0
    dev_fraction: float = 0.02
    dev_max: int = 1000
    min_train: int = 2000
    roots: list[str] | None = None      # folders to search; None = the machine's defaults
    # an existing tokenizer.model to encode with instead of training one (e.g. an
    # imported ChatGLM's, so its checkpoint and these shards share ids)
    tokenizer: str = ""
    split: SplitConfig = field(init=False)

    def __post_init__(self):
        if not isinstance(self.vocab_size, int) or self.vocab_size <= 0:
            raise ValueError(f"vocab_size={self.vocab_size!r} must be a positive integer")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
        self.split = SplitConfig(self.test_catalogs, self.dev_fraction, self.dev_max,
                                 self.seed, self.min_train)
        self.test_catalogs = self.split.test_catalogs

    def settings(self) -> dict:
        """What determines the output; a reused folder must match these."""
        d = asdict(self)
        for k in ("out", "split"):
            d.pop(k)
        d["test_catalogs"] = list(d["test_catalogs"])
        return d


def _manifest(out: Path) -> dict | None:
    path = out / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if not all((out / f).is_file() for f in manifest.get("files", [])):
        return None
    return manifest


def prepare(config: PrepareConfig, force: bool = False, log=print) -> dict:
    """Build (or reuse) the output folder; returns its manifest."""
    out = Path(config.out)
    manifest = _manifest(out)
    if manifest is not None and not force:
        if manifest["settings"] != config.settings():
            diff = sorted(k for k in config.settings()
                          if manifest["settings"].get(k) != config.settings()[k])
            raise ValueError(f"{out} was prepared with different settings ({', '.join(diff)}); "
                             "pass --force to rebuild it")
        log(f"reusing complete {out} (tokenizer {manifest['tokenizer_sha256'][:12]}); "
            "--force rebuilds")
        return manifest
    if out.exists() and manifest is None and not force and any(out.iterdir()):
        raise ValueError(f"{out} exists but is not a complete prepare_data output; "
                         "pass --force to replace it")

    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = _build(config, tmp, log)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out}")
    return manifest


def _swap_in(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _build(config: PrepareConfig, root: Path, log) -> dict:
    timings = {}
    t = time.perf_counter()
    splits, stats = load_corpus(config.split, config.roots)
    timings["extract_split_s"] = time.perf_counter() - t
    log(format_stats(stats))

    t = time.perf_counter()
    for name, pairs in splits.items():
        write_tsv(root / "pairs" / f"{name}.tsv", pairs)
    write_json(root / "stats.json", stats)
    timings["write_pairs_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if config.tokenizer:
        (root / "tokenizer").mkdir(parents=True, exist_ok=True)
        shutil.copy(config.tokenizer, root / "tokenizer" / "tokenizer.model")
        tok = load_tokenizer(root / "tokenizer" / "tokenizer.model")
    else:
        texts = [p.english for p in splits.train] + [p.chinese for p in splits.train]
        tok = Tokenizer.train(texts, root / "tokenizer", vocab_size=config.vocab_size,
                              seed=config.seed)
    timings["tokenizer_s"] = time.perf_counter() - t
    log(f"tokenizer: {tok.vocab_size} pieces, sha256 {tok.sha256[:12]} "
        f"({timings['tokenizer_s']:.1f} s)")

    t = time.perf_counter()
    shard_info = {}
    files = ["stats.json", "tokenizer/tokenizer.model"] + [f"pairs/{s}.tsv" for s in SPLITS]
    for name, pairs in splits.items():
        encoded = list(zip(tok.encode_batch([p.english for p in pairs]),
                           tok.encode_batch([p.chinese for p in pairs])))
        shards = {"translation": (encoded, ("en", "zh"))}
        if name in PRETRAIN_SPLITS:
            docs = (pretrain_documents(encoded, tok.special_ids, config.seed)
                    if getattr(tok, "kind", "glm") == "glm" else
                    causal_documents(encoded, [tok.gmask_id, tok.sop_id], tok.encode("\n"),
                                     tok.eos_id, config.seed))
            shards["pretrain"] = (docs, ("text",))
        for kind, (records, fields) in shards.items():
            prefix = f"shards/{kind}_{name}"
            header = write_shard(root / prefix, records, vocab_size=tok.vocab_size,
                                 tokenizer_sha256=tok.sha256, fields=fields,
                                 meta={"split": name, "kind": kind})
            shard_info[f"{kind}_{name}"] = {k: header[k] for k in
                                            ("num_records", "num_tokens", "dtype")}
            files += [prefix + ext for ext in (".bin", ".idx.npy", ".json")]
    timings["shards_s"] = time.perf_counter() - t
    for name, info in shard_info.items():
        log(f"shard {name:<18} {info['num_records']:>7} records {info['num_tokens']:>9} tokens")

    manifest = {"settings": config.settings(), "tokenizer_sha256": tok.sha256,
                "vocab_size": tok.vocab_size, "pairs": stats["splits"], "shards": shard_info,
                "files": files, "timings_s": {k: round(v, 3) for k, v in timings.items()}}
    write_json(root / "manifest.json", manifest)   # last: marks the folder complete
    return manifest
