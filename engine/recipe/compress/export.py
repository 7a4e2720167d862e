"""Reading a teacher from any checkpoint and writing a pruned student as an ordinary one.

Checkpoints hold full tensor names whatever layout wrote them (engine/train/checkpoint.py), so
the teacher loads by name into a single-process GLM. The student checkpoint has the same
meta.json shape as the trainer's (config with the student's GLMConfig, step 0, rng,
tokenizer sha256, layout) plus a "pruning" record, and tokenizer.model copied inside, so
runners/evaluate.py, runners/distill.py and the trainer's init_from read it like any other.
"""
from __future__ import annotations

import os

from engine.train import checkpoint as ckpt_lib
from engine.recipe.compress.prune import build_from_state
from model import GLM, GLMConfig

TOKENIZER_FILE = "tokenizer.model"


def load_glm(path: str, device="cpu") -> tuple[GLM, ckpt_lib.Checkpoint]:
    """A whole GLM from a checkpoint dir (any writer layout). Aux tensors (a distillation
    projection) are ignored."""
    ckpt = ckpt_lib.Checkpoint(path)
    try:
        config = GLMConfig.from_dict(ckpt.meta["config"]["model"])
    except (KeyError, TypeError):
        raise ckpt_lib.CheckpointError(f"checkpoint {path} has no model config in meta.json") \
            from None
    model = GLM.build(config, device=device)
    ckpt_lib.load_model_weights(model, ckpt)
    return model, ckpt


def save_student(path: str, config: GLMConfig, state: dict, source: ckpt_lib.Checkpoint,
                 record: dict) -> str:
    """Write `state` (a full student state dict) as a checkpoint at `path`, copying the
    source checkpoint's run config, tokenizer hash and tokenizer file. Atomic like every
    checkpoint: a failure leaves an existing `path` untouched."""
    build_from_state(config, state)  # refuse to write tensors that do not form a GLM
    run_config = dict(source.meta.get("config") or {})
    run_config["model"] = config.to_dict()
    meta = {"config": run_config, "step": 0, "data_position": {"step": 0},
            "rng": ckpt_lib.rng_state(),
            "tokenizer_sha256": source.meta.get("tokenizer_sha256"),
            "layout": {"tp": 1, "pp": 1, "dp": 1, "vpp": 1, "zero_stage": 0},
            "pruning": record}
    tok = os.path.join(source.path, TOKENIZER_FILE)
    # inside the atomic save, so it is hashed in meta.json (and checked against
    # tokenizer_sha256) and arrives with the weights
    ckpt_lib.save_checkpoint(path, state, {}, meta,
                             extra_files={TOKENIZER_FILE: tok} if os.path.isfile(tok) else None)
    return path
