"""From a prepared data folder (runners/prepare_data.py) to the datasets a run trains on."""
from __future__ import annotations

import os

from engine.data.datasets import PretrainDataset, TranslationDataset
from model.tokenizer import Tokenizer


def open_data_dir(data_dir: str) -> Tokenizer:
    if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        raise ValueError(f"data folder {data_dir!r} is missing or incomplete (no "
                         f"manifest.json): run `python runners/prepare_data.py --out "
                         f"{data_dir}` first")
    return Tokenizer(os.path.join(data_dir, "tokenizer", "tokenizer.model"))


def make_datasets(data_dir: str, task: str, seq_len: int, seed: int, vocab_size: int,
                  objective: str = "glm", direction: str = "en-zh"):
    """(tokenizer, train, dev) for task "pretrain" (packed mixed-language documents) or
    "translation" (one pair per sequence, loss on the target)."""
    tok = open_data_dir(data_dir)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer in {data_dir} has {tok.vocab_size} pieces but the model's "
                         f"padded_vocab_size is {vocab_size}")
    shards = os.path.join(data_dir, "shards")
    if task == "pretrain":
        train = PretrainDataset(os.path.join(shards, "pretrain_train"), tok, seq_len,
                                objective=objective, seed=seed)
        dev = PretrainDataset(os.path.join(shards, "pretrain_dev"), tok, seq_len,
                              objective=objective, seed=0)
    else:
        train = TranslationDataset(os.path.join(shards, "translation_train"), tok, seq_len,
                                   direction=direction, seed=seed)
        dev = TranslationDataset(os.path.join(shards, "translation_dev"), tok, seq_len,
                                 direction=direction, seed=0, shuffle=False)
    return tok, train, dev
