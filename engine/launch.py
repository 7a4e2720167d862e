"""Glue between a RunConfig and the Trainer: the process groups (under torchrun), data,
tokenizer check, resume, final save."""
from __future__ import annotations

import os
import shutil

import torch.distributed as dist

from engine.config import RunConfig
from engine.data.loaders import make_datasets
from engine.trainer import Trainer


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def parallel_state(cfg: RunConfig):
    """None for a plain single process; otherwise join the torchrun job and build the
    groups. The layout is checked before any collective, so an impossible one fails on
    every rank with the same one-line error instead of a hang."""
    from engine.parallel import ParallelDims, init_distributed
    pc, world = cfg.parallel, world_size()
    tp_pp = pc.tp * pc.pp
    if pc.dp == 0:
        if world % tp_pp:
            raise ValueError(f"world size {world} is not divisible by tp*pp={tp_pp}")
        dp = world // tp_pp
    else:
        dp = pc.dp
    dims = ParallelDims(tp=pc.tp, pp=pc.pp, dp=dp, vpp=pc.vpp)
    dims.validate(world, cfg.model.num_layers)
    if pc.tp > 1:
        heads, groups = cfg.model.num_attention_heads, cfg.model.multi_query_group_num
        if heads % pc.tp or (pc.tp <= groups and groups % pc.tp) or (
                pc.tp > groups and pc.tp % groups):
            raise ValueError(f"parallel.tp={pc.tp} does not divide the model's "
                             f"{heads} heads / {groups} KV groups evenly")
        if cfg.model.ffn_hidden_size % pc.tp or cfg.model.padded_vocab_size % pc.tp:
            raise ValueError(f"parallel.tp={pc.tp} must divide ffn_hidden_size="
                             f"{cfg.model.ffn_hidden_size} and padded_vocab_size="
                             f"{cfg.model.padded_vocab_size}")
    if world == 1:
        return None
    return init_distributed(dims, timeout=pc.timeout_s, num_layers=cfg.model.num_layers)


def model_parallel_group(state):
    """Ranks holding the pieces of one model replica (same dp coordinate): the group the
    optimizer sums squared gradient norms over. new_group is collective: all ranks create
    all groups in the same order."""
    from engine.parallel import rank_to_coords
    if state is None or state.dims.tp * state.dims.pp == 1:
        return None
    world = state.dims.world_size
    mine = None
    for d in range(state.dims.dp):
        ranks = [r for r in range(world) if rank_to_coords(r, state.dims).dp == d]
        group = dist.new_group(ranks, timeout=state.timeout)
        if state.coords.dp == d:
            mine = group
    return mine


def run_training(cfg: RunConfig, resume: bool = False, log=print) -> Trainer:
    tc = cfg.train
    state = parallel_state(cfg)
    try:
        tok, train, dev = make_datasets(cfg.data.dir, cfg.data.task, tc.seq_len, tc.seed,
                                        cfg.model.padded_vocab_size, cfg.data.objective)
        trainer = Trainer(cfg, train, dev, state=state, tokenizer_sha256=tok.sha256, log=log,
                          mp_group=model_parallel_group(state))
        ckpt_dir = os.path.join(tc.out_dir, "checkpoint")
        if resume:
            if not os.path.isdir(ckpt_dir):
                raise ValueError(f"--resume: no checkpoint at {ckpt_dir}")
            trainer.resume(ckpt_dir)
            trainer.log(f"resumed from {ckpt_dir} at step {trainer.step}")
        n_params = sum(p.numel() for _, p in trainer.named_trained_parameters())
        layout = (f"tp={state.dims.tp} pp={state.dims.pp} dp={state.dims.dp} "
                  f"vpp={state.dims.vpp} schedule={trainer.schedule}" if state else
                  "single process")
        trainer.log(f"model: {n_params:,} parameters on rank 0 | {layout} | task "
                    f"{cfg.data.task} | {tc.steps} steps x {tc.num_microbatches} x "
                    f"{tc.micro_batch_size} x {tc.seq_len} per dp rank")
        trainer.fit()
        path = trainer.save(ckpt_dir)
        if trainer.rank == 0:
            # the tokenizer travels with the checkpoint so evaluation needs nothing else
            shutil.copy(os.path.join(cfg.data.dir, "tokenizer", "tokenizer.model"),
                        os.path.join(path, "tokenizer.model"))
            trainer.log(f"saved {path}")
        return trainer
    finally:
        if state is not None and dist.is_initialized():
            dist.destroy_process_group()
