"""A Trainer's checkpoints: gather this rank's shards into full, layout-free tensors and
save them (with the extra files, inside one atomic save); resume by slicing them back
for this rank's layout. engine/train/checkpoint.py is the file format underneath,
engine/train/run_dir.py the step-numbered directories of a run.

Every function here is collective over the trainer's ranks: each rank calls it at the
same point. Failures are agreed on (see `agree`), so one rank's failed write stops all
of them instead of leaving the others waiting in the next collective.
"""
from __future__ import annotations

import os
import shutil

import torch
from safetensors import SafetensorError

from engine.parallel.split import format_split
from engine.train import checkpoint as ckpt_lib
from engine.train.build import run_layer_split
from engine.train.divergence import DivergenceError

OPTIM_KEYS = ("master", "exp_avg", "exp_avg_sq")


def agree(state, step: int, error: tuple | None, payload=None) -> list:
    """Every rank's (error, payload) on every rank (a collective in place of a
    barrier); the first error is raised everywhere, so one rank's failed write stops
    all of them at the same point instead of leaving the others in the next barrier."""
    items = state.all_gather_object((error, payload))
    for rank, (err, _) in enumerate(items):
        if err is not None:
            kind, msg = err
            cls = DivergenceError if kind == "diverged" else ckpt_lib.CheckpointError
            where = f"rank {rank}: " if state.distributed else ""
            raise cls(f"checkpoint at step {step} not saved: {where}{msg}")
    return [p for _, p in items]


def full_tensors(named: list, model_cfg, state) -> dict:
    """This rank's (name, tensor) pairs -> full-shape tensors (collective over tp)."""
    if state.dims.tp == 1:
        return {n: t.detach() for n, t in named}
    from engine.tensor_parallel import gather_full_tensors
    model = [(n, t) for n, t in named if not n.startswith("aux.")]
    out = gather_full_tensors(model, model_cfg, state.tp_group)
    out.update({n: t.detach() for n, t in named if n.startswith("aux.")})
    return out


def local_tensors(full: dict, model_cfg, state, prefix: str = "") -> dict:
    """Full-shape tensors (keys optionally prefixed) -> this TP rank's slices, keyed
    by parameter name."""
    full = {n[len(prefix):]: t for n, t in full.items()}
    tp = state.dims.tp
    if tp == 1:
        return full
    from engine.tensor_parallel import shard_state_dict
    model = {n: t for n, t in full.items() if not n.startswith("aux.")}
    out = shard_state_dict(model, state.coords.tp, tp, model_cfg)
    out.update({n: t for n, t in full.items() if n.startswith("aux.")})
    return out


def gather(parts, model_cfg) -> tuple[dict, dict, dict]:
    """-> (the optimizer's full state, {name: full weight}, {"<key>/<name>": full
    optimizer tensor}): this rank's shards made whole (collective over dp, then tp)."""
    full = parts.optimizer.full_state()   # collective over dp
    tensors = full_tensors(list(parts.named_trained_parameters()), model_cfg, parts.state)
    optim = {}
    for key in OPTIM_KEYS:
        gathered = full_tensors([(n, st[key]) for n, st in full["params"].items()],
                                model_cfg, parts.state)
        optim.update({f"{key}/{n}": t for n, t in gathered.items()})
    return full, tensors, optim


def checkpoint_meta(trainer, optimizer_state: dict) -> dict:
    """meta.json's content for the trainer's state now (RNG included: call it last)."""
    cfg, step = trainer.cfg, trainer.step
    return {
        "config": cfg.to_dict(),
        "step": step,
        "data_position": {"step": step},
        "rng": ckpt_lib.rng_state(),
        "tokenizer_sha256": trainer.tokenizer_sha256,
        "layout": {"tp": trainer.tp, "pp": trainer.pp, "dp": trainer.dp,
                   "vpp": trainer.state.dims.vpp,
                   # the layers of each virtual stage (a record: weights load
                   # into any split, layers are named by global index)
                   "layer_split": format_split(run_layer_split(cfg, trainer.state)),
                   "sequence_parallel": cfg.parallel.sequence_parallel,
                   "zero_stage": cfg.parallel.zero_stage},
        "optimizer": {k: v for k, v in optimizer_state.items() if k != "params"},
        "divergence": trainer.guard.state_dict(),
        "metrics": trainer.metrics.state_dict(),
        **trainer.extra_meta,
    }


def probe(trainer):
    """One forward (no dropout, no gradients, no RNG drawn) of the next training batch
    on the state about to be saved; the same value on every rank."""
    loss = trainer.forward_loss(trainer.microbatches(trainer.train_data, trainer.step))
    trainer.guard.check_state(trainer.step, loss)


def save(trainer, path: str | None = None) -> str:
    """Every rank takes part; the first dp rank of each stage writes that stage's
    model and optimizer tensors under their global names (layout-free). Without
    `path` the checkpoint is out_dir/checkpoints/step_N (the last K kept,
    out_dir/checkpoint pointing at the newest: engine/train/run_dir.py). A state that
    diverged (in a run of skipped steps, or with inf/nan weights) is never written;
    free space is checked first; a failed save removes its partial files."""
    step, state, store, cfg = trainer.step, trainer.state, trainer.store, trainer.cfg
    if path is None and trainer.saved_step == step:
        return store.path(step)   # this state is on disk already
    if path is None and trainer.guard.in_streak:
        raise DivergenceError(f"checkpoint at step {step} not saved: the last "
                              f"{trainer.guard.skipped_in_a_row} step(s) were skipped for "
                              "inf/nan gradients")
    if path is None:
        probe(trainer)
    full, tensors, optim = gather(trainer.parts, cfg.model)
    writer = trainer.dp_rank == 0 and trainer.tp_rank == 0
    error, nbytes = None, 0
    if writer:
        nbytes = ckpt_lib.tensor_bytes(tensors) + ckpt_lib.tensor_bytes(optim)
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            error = ("diverged", "the weights hold inf/nan")
    sizes = agree(state, step, error, nbytes)
    managed = path is None
    tmp = store.tmp_for(step) if managed else ckpt_lib.temp_dir_for(path)
    error = None
    if trainer.rank == 0:
        try:
            need = sum(sizes) + sum(os.path.getsize(p) for p in trainer.extra_files.values())
            tmp = store.begin(step) if managed else ckpt_lib.begin_save(path)
            ckpt_lib.check_free_space(tmp, need + (1 << 20), f"checkpoint step {step}")
        except (OSError, ValueError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = ("failed", str(e))
    agree(state, step, error)
    error = None
    if writer:
        try:
            ckpt_lib.write_tensors(tmp, f"model/stage{trainer.stage}.safetensors", tensors)
            ckpt_lib.write_tensors(tmp, f"optim/stage{trainer.stage}.safetensors", optim)
        except (OSError, SafetensorError, ValueError) as e:
            error = ("failed", f"writing {tmp}: {e}")
    try:
        agree(state, step, error)
    except ckpt_lib.CheckpointError:
        if trainer.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    error = None
    final = store.path(step) if managed else os.path.abspath(path)
    if trainer.rank == 0:
        meta = checkpoint_meta(trainer, full)
        try:
            if managed:
                if step >= cfg.train.steps:
                    store.pinned = None       # the run is complete
                store.commit(step, meta, trainer.extra_files)
            else:
                ckpt_lib.finish_save(path, meta, trainer.extra_files)
        except (OSError, ValueError) as e:
            if os.path.isdir(tmp):          # not yet renamed into place: partial
                shutil.rmtree(tmp, ignore_errors=True)
            error = ("failed", str(e))
    agree(state, step, error)
    if managed:
        trainer.saved_step = step
    return final


def load_trained_state(parts, ckpt: ckpt_lib.Checkpoint, model_cfg):
    """The checkpoint's weights and optimizer state into this rank's parts (any layout
    the checkpoint was written by)."""
    state = parts.state
    names = [n for n, _ in parts.named_trained_parameters()]
    weights = local_tensors(ckpt.load("model", names), model_cfg, state)
    with torch.no_grad():
        for n, p in parts.named_trained_parameters():
            if weights[n].shape != p.shape:
                raise ckpt_lib.CheckpointError(
                    f"checkpoint tensor {n} has shape {tuple(weights[n].shape)}, this "
                    f"layout expects {tuple(p.shape)} (a different model config?)")
            p.copy_(weights[n])
    per_key = {k: local_tensors(
        {n: t for n, t in ckpt.load("optim", [f"{k}/{n}" for n in names]).items()},
        model_cfg, state, prefix=f"{k}/") for k in OPTIM_KEYS}
    optim_state = {"params": {n: {k: per_key[k][n] for k in OPTIM_KEYS} for n in names},
                   **ckpt.meta["optimizer"]}
    parts.optimizer.load_state_dict(optim_state)


def resume(trainer, path: str):
    """Continue from checkpoint `path`: weights, optimizer, step (the data position),
    RNG and the divergence guard's history."""
    ckpt = ckpt_lib.Checkpoint(path)
    ckpt.check_tokenizer(trainer.tokenizer_sha256)
    load_trained_state(trainer.parts, ckpt, trainer.cfg.model)
    trainer.step = int(ckpt.meta["step"])
    ckpt_lib.set_rng_state(ckpt.meta["rng"])
    trainer.guard.load_state_dict(ckpt.meta.get("divergence") or {})
    trainer.metrics.load_state_dict(ckpt.meta.get("metrics") or {})
    store = trainer.store
    if os.path.realpath(os.path.dirname(path)) == os.path.realpath(store.root):
        trainer.saved_step = trainer.step      # resuming in place: that step is saved
        store.pinned = os.path.join(store.root, os.path.basename(path))
    warn_schedule_change(trainer, ckpt.meta)


def warn_schedule_change(trainer, meta: dict):
    """lr_at depends on these: another value moves the LR curve under a resumed run."""
    old = (meta.get("config") or {}).get("train") or {}
    tc = trainer.cfg.train
    changed = [f"{k} {old[k]} -> {getattr(tc, k)}"
               for k in ("steps", "lr", "min_lr", "warmup_steps")
               if k in old and old[k] != getattr(tc, k)]
    if changed:
        trainer.log(f"warning: resuming with another LR schedule than the checkpoint's "
                    f"({', '.join(changed)}): the learning rate changes from step "
                    f"{trainer.step} on")
