"""Packed token shards: one flat token array on disk plus document offsets.

    PREFIX.bin      tokens, uint16 when the vocabulary fits (< 65536) else uint32; memmapped
    PREFIX.idx.npy  int64 offsets [num_docs + 1]: doc i is bin[idx[i]:idx[i+1]]
    PREFIX.json     header: dtype, counts, vocab size, tokenizer sha256, record fields

A shard of records with several fields (a translation pair: en, zh) stores each record
as consecutive documents, fields in header order. Every file is written to a temp name
and renamed, the header last: a shard with a header is complete, and a failed write never
touches an existing file. Reading validates everything it can cheaply check and fails
with a one-line ValueError naming the file.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from engine.recipe.data.io import staged_path

FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


def shard_paths(prefix: str | os.PathLike) -> dict[str, Path]:
    prefix = str(prefix)
    return {"bin": Path(prefix + ".bin"), "idx": Path(prefix + ".idx.npy"),
            "json": Path(prefix + ".json")}


def write_shard(prefix: str | os.PathLike, records, *, vocab_size: int,
                tokenizer_sha256: str, fields: tuple[str, ...] = ("text",),
                meta: dict | None = None) -> dict:
    """Write `records` (token lists, or tuples of token lists when there are several
    `fields`) and return the header. Token ids are checked against `vocab_size`."""
    if not fields:
        raise ValueError("fields must name at least one field")
    dtype = token_dtype(vocab_size)
    lengths, chunks = [], []
    for r, record in enumerate(records):
        docs = (record,) if len(fields) == 1 else tuple(record)
        if len(docs) != len(fields):
            raise ValueError(f"record {r} has {len(docs)} fields, expected {len(fields)} "
                             f"({', '.join(fields)})")
        for doc in docs:
            arr = np.asarray(doc, dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise ValueError(f"record {r}: token id outside [0, {vocab_size})")
            lengths.append(arr.size)
            chunks.append(arr.astype(dtype))
    if not chunks:
        raise ValueError(f"{prefix}: refusing to write an empty shard (no records)")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(chunks)
    header = {"format_version": FORMAT_VERSION, "dtype": dtype.name,
              "num_tokens": int(tokens.size), "num_docs": len(lengths),
              "num_records": len(lengths) // len(fields), "fields": list(fields),
              "vocab_size": int(vocab_size), "tokenizer_sha256": tokenizer_sha256,
              "meta": meta or {}}
    paths = shard_paths(prefix)
    # all three to temp files first: a failure here leaves any existing shard untouched
    with contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(staged_path(p)) for k, p in paths.items()}
        tokens.tofile(tmp["bin"])
        with open(tmp["idx"], "wb") as f:  # np.save on a path would append ".npy"
            np.save(f, offsets)
        tmp["json"].write_text(json.dumps(header, indent=2, sort_keys=True) + "\n",
                               encoding="utf-8")
        # then swap in: old header out first, new header last, so a crash in between
        # leaves a shard without header, which readers reject as incomplete
        paths["json"].unlink(missing_ok=True)
        for k in ("bin", "idx", "json"):
            os.replace(tmp[k], paths[k])
    return header


class Shard:
    """Read-only view of a shard; tokens stay on disk (memmap) until indexed."""

    def __init__(self, prefix: str | os.PathLike, expect_tokenizer_sha256: str | None = None):
        paths = shard_paths(prefix)
        self.prefix = str(prefix)
        for p in paths.values():
            if not p.is_file():
                raise ValueError(f"{p}: shard file not found (run runners/prepare_data.py)")
        try:
            header = json.loads(paths["json"].read_text(encoding="utf-8"))
            self.dtype = np.dtype(header["dtype"])
            self.num_tokens = int(header["num_tokens"])
            self.num_docs = int(header["num_docs"])
            self.fields = tuple(header["fields"])
            self.vocab_size = int(header["vocab_size"])
            self.tokenizer_sha256 = header["tokenizer_sha256"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{paths['json']}: unreadable shard header ({e})") from None
        self.header = header
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ValueError(f"{paths['json']}: unsupported token dtype {self.dtype}")
        if self.num_docs == 0 or self.num_tokens == 0:
            raise ValueError(f"{paths['json']}: empty shard ({self.num_docs} documents, "
                             f"{self.num_tokens} tokens)")
        if not self.fields or self.num_docs % len(self.fields):
            raise ValueError(f"{paths['json']}: {self.num_docs} documents do not form whole "
                             f"records of fields {self.fields}")
        if (expect_tokenizer_sha256 is not None
                and self.tokenizer_sha256 != expect_tokenizer_sha256):
            raise ValueError(f"{paths['json']}: written with tokenizer "
                             f"{self.tokenizer_sha256[:12]}, expected "
                             f"{expect_tokenizer_sha256[:12]}; rerun prepare_data --force")
        size = paths["bin"].stat().st_size
        if size != self.num_tokens * self.dtype.itemsize:
            raise ValueError(f"{paths['bin']}: {size} bytes, header says {self.num_tokens} "
                             f"{self.dtype} tokens ({self.num_tokens * self.dtype.itemsize} "
                             "bytes)")
        try:
            self.offsets = np.load(paths["idx"], allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{paths['idx']}: unreadable index ({e})") from None
        o = self.offsets
        if (o.ndim != 1 or o.size != self.num_docs + 1 or o[0] != 0
                or o[-1] != self.num_tokens or np.any(np.diff(o) < 0)):
            raise ValueError(f"{paths['idx']}: offsets do not match the header "
                             f"({self.num_docs} documents, {self.num_tokens} tokens)")
        self.tokens = np.memmap(paths["bin"], dtype=self.dtype, mode="r")

    @property
    def num_records(self) -> int:
        return self.num_docs // len(self.fields)

    def __len__(self) -> int:
        return self.num_records

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int):
        """Record i: a token array, or a tuple of arrays (one per field)."""
        if not -self.num_records <= i < self.num_records:
            raise IndexError(f"record {i} out of range for {self.num_records} records")
        i %= self.num_records
        k = len(self.fields)
        docs = tuple(self.doc(i * k + f) for f in range(k))
        return docs[0] if k == 1 else docs
