"""Convert checkpoints between the native format and the ChatGLM2/3 / GLM-4 naming
(runners/convert_checkpoint.py is its command line: engine/train/convert_command.py).

Only names change (model/convert.py): values and shapes are copied as stored unless
convert.dtype casts them. An imported checkpoint holds the weights, meta.json with the config
and step 0, and no optimizer state: start a run from it with --train.init_from, not
--resume. Outputs are written to a temporary sibling and renamed into place; an existing
output is replaced only with --force.

An imported model is causal 1D (position_layout "causal1d"), with the rope scaling its own
modeling_chatglm.py applies (convert.rope_scaling overrides the detection) and, for chat models,
its chat prompt (convert.chat_format; detected from the published name). ChatGLM2/3's
sentencepiece tokenizer.model comes along and loads with its special tokens
(model/chatglm_tokenizer.py); GLM-4's tiktoken tokenizer is not supported and is left out.
"""
from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from engine.train import checkpoint as ckpt_lib
from engine.config import RunConfig
from model import GLM, GLMConfig
from model.convert import export_chatglm, load_chatglm

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER = "tokenizer.model"
GB = 1024 ** 3


def native_model(ckpt: ckpt_lib.Checkpoint, dtype: torch.dtype | None = None) -> GLM:
    """The whole GLM from a native checkpoint's model tensors (full names, whatever layout
    wrote them). Built on the meta device and filled tensor by tensor, so peak memory is
    the checkpoint's tensors once; auxiliary tensors ("aux.*") are left out."""
    try:
        config = GLMConfig.from_dict(ckpt.meta["config"]["model"])
    except (KeyError, TypeError):
        raise ckpt_lib.CheckpointError(f"checkpoint {ckpt.path} has no model config in "
                                       "meta.json") from None
    with torch.device("meta"):
        model = GLM(config)
    names = [n for n, _ in model.named_parameters()]
    tensors = ckpt.load("model", names)
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        want = tuple(getattr(module, leaf).shape)
        t = tensors.pop(name)
        if tuple(t.shape) != want:
            raise ckpt_lib.CheckpointError(f"checkpoint tensor {name} has shape "
                                           f"{tuple(t.shape)}, its config expects {want}")
        setattr(module, leaf, nn.Parameter(t if dtype is None else t.to(dtype),
                                           requires_grad=False))
    return model


def to_chatglm(src: str, out: str, dtype: torch.dtype | None = None,
               max_shard_gb: float = 2.0, overwrite: bool = False) -> list[str]:
    """Native checkpoint directory -> ChatGLM directory; returns the shard file names."""
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists; pass --force to replace it")
    ckpt = ckpt_lib.Checkpoint(src)
    tok = os.path.join(src, TOKENIZER)
    have = None
    if os.path.isfile(tok):
        # the checkpoint lists its tokenizer's sha256 (older ones only in tokenizer_sha256):
        # a swapped file would ship a model with another vocabulary
        want = ckpt.meta["files"].get(TOKENIZER) or ckpt.meta.get("tokenizer_sha256")
        have = ckpt_lib.sha256_file(tok)
        if want and have != want:
            raise ckpt_lib.CheckpointError(f"{tok} (sha256 {have[:12]}) is not the tokenizer "
                                           f"checkpoint {src} was trained with "
                                           f"({want[:12]}); not shipping it")
    names = export_chatglm(native_model(ckpt, dtype), out,
                           max_shard_bytes=int(max_shard_gb * GB), overwrite=overwrite)
    if have is not None:   # ChatGLM keeps it beside the weights
        shutil.copy(tok, os.path.join(out, TOKENIZER))
        if ckpt_lib.sha256_file(os.path.join(out, TOKENIZER)) != have:
            raise ckpt_lib.CheckpointError(f"copying {tok} to {out} changed its bytes")
    return names


def _shards(named: list[tuple[str, torch.Tensor]], max_bytes: int):
    """Consecutive groups of tensors of at most max_bytes (a bigger tensor alone)."""
    group, size = [], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if group and size + nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append((name, t))
        size += nbytes
    if group:
        yield group


def source_tokenizer(src: str, vocab: int, log=print) -> str | None:
    """The ChatGLM directory's tokenizer.model when this project can use it, else None
    (with one line saying why)."""
    from model.chatglm_tokenizer import is_tiktoken
    from model.tokenizer import load_tokenizer
    tok = os.path.join(src, TOKENIZER)
    if not os.path.isfile(tok):
        log(f"note: {src} has no {TOKENIZER}; the checkpoint has no tokenizer")
        return None
    with open(tok, "rb") as f:
        data = f.read()
    if is_tiktoken(data):
        log(f"note: {tok} is GLM-4's tiktoken tokenizer, which is not supported (it would "
            "need a tiktoken dependency): weights converted, tokenizer left out")
        return None
    t = load_tokenizer(tok)   # ChatGLM's, or a native one that an export carried along
    if t.vocab_size > vocab:
        raise ValueError(f"{tok} has {t.vocab_size} ids but padded_vocab_size is {vocab}")
    return tok


def from_chatglm(src: str, out: str, dtype: torch.dtype | None = None,
                 max_shard_gb: float = 2.0, overwrite: bool = False, log=print,
                 **config_overrides) -> str:
    """ChatGLM directory -> native checkpoint (weights, config, step 0, no optimizer).
    config_overrides: rope_scaling / chat_format instead of the detected ones."""
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists; pass --force to replace it")
    model = load_chatglm(src, dtype=dtype, **config_overrides)
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    tok = source_tokenizer(src, model.config.padded_vocab_size, log)
    meta = {
        "config": RunConfig(model=model.config).to_dict(),
        "step": 0,
        "data_position": {"step": 0},
        "rng": ckpt_lib.rng_state(),
        "tokenizer_sha256": ckpt_lib.sha256_file(tok) if tok else None,
        "layout": {"tp": 1, "pp": 1, "dp": 1, "vpp": 1, "sequence_parallel": False,
                   "zero_stage": 0},
        "optimizer": None,
        "imported_from": os.path.abspath(src),
    }
    tmp = ckpt_lib.begin_save(out)
    try:
        shards = list(_shards(named, int(max_shard_gb * GB)))
        for i, group in enumerate(shards):
            ckpt_lib.write_tensors(tmp, f"model/part-{i + 1:05d}-of-{len(shards):05d}"
                                        ".safetensors", dict(group))
        if meta["tokenizer_sha256"]:
            shutil.copy(tok, os.path.join(tmp, TOKENIZER))
        ckpt_lib.finish_save(out, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


