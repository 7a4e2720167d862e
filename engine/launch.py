"""Glue between a RunConfig and the Trainer: data, tokenizer check, resume, final save."""
from __future__ import annotations

import os

from engine.config import RunConfig
from engine.data.loaders import make_datasets
from engine.trainer import Trainer


def run_training(cfg: RunConfig, resume: bool = False, log=print) -> Trainer:
    tc = cfg.train
    tok, train, dev = make_datasets(cfg.data.dir, cfg.data.task, tc.seq_len, tc.seed,
                                    cfg.model.padded_vocab_size, cfg.data.objective)
    trainer = Trainer(cfg, train, dev, tokenizer_sha256=tok.sha256, log=log)
    ckpt_dir = os.path.join(tc.out_dir, "checkpoint")
    if resume:
        if not os.path.isdir(ckpt_dir):
            raise ValueError(f"--resume: no checkpoint at {ckpt_dir}")
        trainer.resume(ckpt_dir)
        log(f"resumed from {ckpt_dir} at step {trainer.step}")
    log(f"model: {trainer.model.num_params():,} parameters | task {cfg.data.task} | "
        f"{tc.steps} steps x {tc.num_microbatches} x {tc.micro_batch_size} x {tc.seq_len}")
    trainer.fit()
    path = trainer.save(ckpt_dir)
    # the tokenizer travels with the checkpoint so evaluation needs nothing else
    import shutil
    shutil.copy(os.path.join(cfg.data.dir, "tokenizer", "tokenizer.model"),
                os.path.join(path, "tokenizer.model"))
    log(f"saved {path}")
    return trainer
