"""How much of a dataset's batches is padding: the figure packing is judged by.

    python -m engine.recipe.data.padding --data-dir data --seq-len 48 --batch 64 --batches 100
prints, for translation unpacked and packed, and for pretraining, the fraction of
positions that are padding (input pad tokens) over the first `batches` training batches.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def padding_fraction(dataset, batch_size: int, batches: int, pad_id: int) -> float:
    pad = total = 0
    for i in range(batches):
        ids = dataset.get_batch(i, batch_size)["input_ids"]
        pad += int((ids == pad_id).sum())
        total += ids.numel()
    return pad / max(total, 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--direction", default="en-zh")
    a = p.parse_args(argv)
    from engine.recipe.data.datasets import PretrainDataset, TranslationDataset
    from engine.recipe.data.loaders import open_data_dir
    tok = open_data_dir(a.data_dir)
    shards = os.path.join(a.data_dir, "shards")
    pad = tok.special_ids.pad
    for name, make in [
        ("translation, one pair per row", lambda: TranslationDataset(
            os.path.join(shards, "translation_train"), tok, a.seq_len, a.direction)),
        ("translation, packed", lambda: TranslationDataset(
            os.path.join(shards, "translation_train"), tok, a.seq_len, a.direction,
            pack=True)),
        ("pretrain (documents packed per window)", lambda: PretrainDataset(
            os.path.join(shards, "pretrain_train"), tok, a.seq_len))]:
        t0 = time.perf_counter()
        ds = make()
        frac = padding_fraction(ds, a.batch, a.batches, pad)
        print(f"{name:42s} padding {100 * frac:5.1f}% of {a.batches} x {a.batch} x "
              f"{a.seq_len} positions ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
