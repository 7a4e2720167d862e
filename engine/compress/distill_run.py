"""Wiring a distillation run onto the engine's Trainer, in any pp x dp layout.

The student is an ordinary run: cfg.model is its shape and cfg.train.init_from its
checkpoint (empty: from scratch), so the Trainer builds and loads this rank's stages
like any pretraining run. The objective is DistillLoss.forward_step: the last stage
computes the loss from its own outputs and the outputs of a whole, frozen teacher held on
the last-stage ranks only (the teacher reads the batch's input_ids, so nothing about it
crosses a pipeline boundary). The hidden-state projection is trained there too, as the
aux module "proj". Tensor parallelism is refused for now (see distill_trainer).
"""
from __future__ import annotations

import torch

from engine.compress.distill import DistillConfig, DistillLoss, make_projection
from engine.config import RunConfig


def is_last_stage(state) -> bool:
    return state is None or state.coords.pp == state.dims.pp - 1


def distill_trainer(cfg: RunConfig, dcfg: DistillConfig, train, dev=None, *,
                    teacher: torch.nn.Module | None, kept_hidden: list[int] | None = None,
                    state=None, tokenizer_sha256: str | None = None, log=print,
                    extra_meta: dict | None = None):
    """-> (Trainer, DistillLoss). `teacher` is needed on last-stage ranks when a KD term
    has weight; `kept_hidden` (the pruning's kept teacher channels) starts the projection
    as that selection."""
    from engine.launch import model_parallel_group
    from engine.trainer import Trainer

    if state is not None and state.dims.tp > 1:
        # the KD terms read the student's whole-vocabulary logits and whole-sequence hidden
        # state on one rank; under tp they are vocab-sharded / sequence-sharded
        raise ValueError("distillation with parallel.tp > 1 is not supported yet (needs a "
                         "vocab-parallel KL and the sequence-gathered final hidden state)")
    last = is_last_stage(state)
    proj = None
    if last and teacher is not None and dcfg.hidden_weight > 0:
        hs, ht = cfg.model.hidden_size, teacher.config.hidden_size
        if hs != ht:
            fits = kept_hidden is not None and len(kept_hidden) == hs and max(kept_hidden) < ht
            proj = make_projection(hs, ht, kept_hidden if fits else None)
            log(f"hidden projection {hs} -> {ht} "
                f"({'the pruning channel selection' if fits else 'random init'})")
    if last and dcfg.needs_teacher:
        if teacher is None:
            raise ValueError("distill: the last pipeline stage needs the teacher")
        if teacher.config.padded_vocab_size != cfg.model.padded_vocab_size:
            raise ValueError(f"teacher vocab {teacher.config.padded_vocab_size} != student "
                             f"vocab {cfg.model.padded_vocab_size}")
        device = state.device if state is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        teacher = teacher.to(device)
    loss = DistillLoss(teacher if last else None,
                       dcfg if last else DistillConfig(kl_weight=0, hidden_weight=0), proj)
    trainer = Trainer(cfg, train, dev, state=state, tokenizer_sha256=tokenizer_sha256,
                      log=log, extra_meta=extra_meta, forward_step=loss.forward_step,
                      aux_modules={"proj": proj} if proj is not None else None,
                      mp_group=model_parallel_group(state))
    return trainer, loss
