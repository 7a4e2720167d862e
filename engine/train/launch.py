"""Glue between a RunConfig and the Trainer: the layout (`--parallel auto`), the process
groups (under torchrun), the out_dir (lock, resume or refuse: engine/train/run_dir.py).
The lifecycle that uses them is engine/train/lifecycle.py."""
from __future__ import annotations

import dataclasses
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.config import RunConfig


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def parallel_state(cfg: RunConfig):
    """ParallelState.single() for a plain single process; otherwise join the torchrun job
    and build the groups. The layout is checked before any collective, so an impossible
    one fails on every rank with the same one-line error instead of a hang."""
    from engine.parallel.rules import infer_dp, tp_problem
    from engine.parallel.state import ParallelDims, ParallelState, init_distributed
    pc, world = cfg.parallel, world_size()
    dims = ParallelDims(tp=pc.tp, pp=pc.pp, dp=infer_dp(pc.tp, pc.pp, pc.dp, world),
                        vpp=pc.vpp)
    dims.validate(world, cfg.model.num_layers, pc.layer_split)
    problem = tp_problem(cfg.model, pc.tp)
    if problem:
        raise ValueError(f"parallel.tp={pc.tp}: {problem}")
    if world == 1:
        return ParallelState.single()
    from engine.parallel.monitor import start_monitor
    state = init_distributed(dims, timeout=pc.timeout_s, num_layers=cfg.model.num_layers,
                             layer_split=pc.layer_split)
    start_monitor(state)   # heartbeats: a dead or hung rank is named (engine/parallel/monitor.py)
    return state


# ---- --parallel auto --------------------------------------------------------------------

def plan_parallel(cfg: RunConfig, world: int, profile, local_world: int | None = None):
    """The planner's layout for this run, as a new RunConfig: (config, candidates best
    first, chosen candidate). Pure: no process group, the device profile is given.

    Global batch = micro_batch_size * num_microbatches * dp of `cfg` (sequences), kept.
    Layouts with and without activation recompute are considered (the choice sets
    train.recompute), only recompute ones when the config asks for it (train.recompute
    true is kept, false leaves the choice to the planner); sequence parallelism needs
    seq_len divisible by tp (else that tp runs without it)."""
    from engine.parallel.rules import infer_dp, planner_precision
    from engine.planner import PlanRequest, best, plan
    from engine.planner.search import Candidate
    tc, pc = cfg.train, cfg.parallel
    local_world = local_world or world
    global_batch = tc.micro_batch_size * tc.num_microbatches * infer_dp(pc.tp, pc.pp, pc.dp,
                                                                        world)
    memory_gb = pc.memory_gb or profile.memory_bytes / 1e9
    if not profile.async_launch:
        memory_gb /= local_world       # CPU ranks of one host share its memory
    precision = planner_precision(tc.precision, profile.precision)
    kernels = {"torch": "torch", "triton": "fused"}.get(cfg.model.kernels, profile.kernels)
    common = dict(config=cfg.model, world_size=world, device_memory_gb=memory_gb,
                  seq_len=tc.seq_len, global_batch=global_batch,
                  gpus_per_node=min(world, local_world), precision=precision,
                  kernels=kernels, recompute=(True,) if tc.recompute else (False, True),
                  layer_split=pc.layer_split)
    cands = [c for c in plan(PlanRequest(**common, sequence_parallel=True), profile)
             if c.layout.tp == 1 or tc.seq_len % c.layout.tp == 0]
    cands += [c for c in plan(PlanRequest(**common, sequence_parallel=False), profile)
              if c.layout.tp > 1 and tc.seq_len % c.layout.tp]
    cands.sort(key=Candidate.sort_key)
    chosen = best(cands)
    lay = chosen.layout
    parallel = dataclasses.replace(pc, tp=lay.tp, pp=lay.pp, dp=lay.dp, vpp=lay.vpp,
                                   schedule=lay.schedule if lay.pp > 1 else pc.schedule,
                                   zero_stage=lay.zero_stage,
                                   sequence_parallel=lay.sequence_parallel, auto=False)
    train = dataclasses.replace(tc, micro_batch_size=lay.micro_batch_size,
                                num_microbatches=lay.num_microbatches,
                                recompute=lay.recompute)
    return dataclasses.replace(cfg, parallel=parallel, train=train), cands, chosen


def _join_world(timeout_s: float):
    """The default process group from the torchrun environment (init_distributed reuses
    it), so every rank can calibrate together and agree on one plan."""
    if dist.is_initialized():
        return
    device = None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device is not None else "gloo",
                            timeout=timedelta(seconds=timeout_s), device_id=device)


def resolve_parallel(cfg: RunConfig, log=print) -> RunConfig:
    """`--parallel auto`: fill the layout fields from the planner before anything is
    built; any other config comes back unchanged. Under torchrun every rank joins the
    default group and calibrates (collectives are measured too), rank 0 plans, and its
    choice is broadcast, so all ranks build the same layout even where measurements
    differ between them. Rank 0 logs the choice and the head of the candidate table."""
    if not cfg.parallel.auto:
        return cfg
    from engine.planner import calibrate, device_profile, format_table
    world = world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world > 1:
        _join_world(cfg.parallel.timeout_s)
    rank = dist.get_rank() if dist.is_initialized() else 0
    name = cfg.parallel.device
    profile = calibrate(repeats=3) if name == "measure" else (
        calibrate(torch.device("cpu"), repeats=3) if name == "cpu" else device_profile(name))
    box = [None]
    if rank == 0:
        try:
            box[0] = plan_parallel(cfg, world, profile, local_world)
        except ValueError as e:
            box[0] = e
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], ValueError):     # every rank fails with rank 0's one-line error
        raise ValueError(f"--parallel auto: {box[0]}")
    resolved, cands, chosen = box[0]
    if rank == 0:
        m, t, lay = chosen.memory.peak, chosen.time, chosen.layout
        log(f"parallel auto: {world} rank(s), {profile.name}, seq {cfg.train.seq_len}, global "
            f"batch {lay.dp * lay.micro_batch_size * lay.num_microbatches}: chose "
            f"{lay.short()} (schedule {lay.schedule}; predicted {m.total / 1e9:.2f} GB per "
            f"device, {t.total:.3f} s per step)")
        log("\n".join(format_table(cands, top=5).splitlines()[:7]))
    return resolved


def stopped_line(trainer, path: str) -> str:
    return (f"stopped by {trainer.stopped_by} after step {trainer.step}/"
            f"{trainer.cfg.train.steps}: saved {path} (continue with --resume)")


def open_out_dir(cfg: RunConfig, state, resume: bool, force: bool, log=print):
    """The run's out_dir, locked, with the checkpoint to resume from (engine/train/run_dir.py)."""
    from engine.train.run_dir import open_run_dir
    return open_run_dir(cfg.train.out_dir, resume=resume, force=force,
                        keep=cfg.train.keep_checkpoints, state=state, log=log,
                        command=" ".join(sys.argv))
