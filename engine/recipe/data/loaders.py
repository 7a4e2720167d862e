"""From a prepared data folder (runners/prepare_data.py) to the datasets a run trains on."""
from __future__ import annotations

import os

from engine.recipe.data.datasets import PretrainDataset, TranslationDataset
from engine.recipe.data.prompts import TranslationFormat
from model.tokenizer import load_tokenizer


def open_data_dir(data_dir: str):
    """The folder's tokenizer: native, or an imported ChatGLM's (prepare_data --data.tokenizer)."""
    if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        raise ValueError(f"data folder {data_dir!r} is missing or incomplete (no "
                         f"manifest.json): run `python runners/prepare_data.py --data.dir "
                         f"{data_dir}` first")
    return load_tokenizer(os.path.join(data_dir, "tokenizer", "tokenizer.model"))


def make_datasets(data_dir: str, task: str, seq_len: int, seed: int, vocab_size: int,
                  objective: str = "glm", direction: str = "en-zh", model_config=None,
                  pack: bool = True):
    """(tokenizer, train, dev) for task "pretrain" (packed mixed-language documents) or
    "translation" (pairs packed several per row, loss on the target). model_config (GLMConfig)
    picks the layout the model was trained with: a causal1d model (an imported ChatGLM)
    gets the causal objective and its own translation prompt (engine/recipe/data/prompts.py).
    pack: translation training rows hold several pairs (document masking); the dev set
    stays one pair per row so that its losses compare with unpacked runs."""
    tok = open_data_dir(data_dir)
    fmt = TranslationFormat(tok, model_config)
    if model_config is not None and model_config.causal:
        objective = "causal"   # GLM blank infilling would train a layout it never saw
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
                                   direction=direction, seed=seed, fmt=fmt, pack=pack)
        dev = TranslationDataset(os.path.join(shards, "translation_dev"), tok, seq_len,
                                 direction=direction, seed=0, shuffle=False, fmt=fmt)
    return tok, train, dev
