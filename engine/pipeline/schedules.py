"""Pipeline schedules: no pipelining, GPipe, 1F1B, interleaved 1F1B, ZB-H1, forward-only.

Entry point (engine/train/trainer.py calls it once per optimizer step):

    forward_backward(StepContext(schedule, chunks, microbatches, num_tokens, comm, state,
                                 forward_only=..., no_sync=..., ...)) -> float

StepContext holds everything one step needs (fields below, in this order; all but the
first four have defaults). It is frozen: build one per call, or keep one per run and
derive a step's with dataclasses.replace.

    schedule      "none" (gradient accumulation, pp == 1), "gpipe", "1f1b", "interleaved"
                  (vpp >= 2, m a multiple of pp), "zb-h1"; forward_only ignores it
    chunks        this rank's model chunks, vpp of them (engine.pipeline.stage.build_stage)
    microbatches  this data-parallel rank's m batch dicts (model.masks.collate); every stage
                  gets all of them, but only the first stage reads input_ids and the side
                  tensors, only the last reads labels: the others use what they receive
    num_tokens    labels != -100 over the whole global batch (all dp ranks, all
                  microbatches), computed by the caller
    comm          engine.pipeline.p2p.P2P, or None when pp == 1
    state         engine.parallel.state.ParallelState (None: ParallelState.single())
    forward_only  no backward (evaluation, teacher inference); `outputs` then receives the
                  last stage's per-microbatch outputs (token losses [b, s] or logits)
    no_sync       () -> context manager (DDP-style); every backward but the last one of each
                  chunk runs inside it, so the data-parallel reduction happens once, during
                  the last backward of each chunk
    forward_step  (chunk, batch, hidden | None, Side) -> output; autocast wraps it
    autocast      () -> context manager around each forward (e.g. bf16 autocast)
    stats, meter  optional measurements (engine.pipeline.stats: ScheduleStats,
                  SavedActivationMeter)
    outputs       a list that, on the last stage, receives each microbatch's output in order
    scale_loss    loss -> scaled loss before the last stage's backward (fp16 loss scaling)
    returns       the step loss: sum over microbatches of token_losses.sum() / num_tokens,
                  all-reduced from the last stage over the pipeline and summed over dp:
                  the same float on every rank

Loss convention: each microbatch's loss is its summed token loss / num_tokens and
backward runs on that, so summing gradients over microbatches and then over dp ranks
gives exactly the gradients of single-process accumulation over the global batch.

The parts: engine/pipeline/program.py (the pure op lists, cached per layout),
executor.py (runs a program over P2P), stats.py (measurement), stage.py (build_stage,
glm_forward_step).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager

import torch
import torch.distributed as dist

from engine.parallel.state import or_single
from engine.pipeline.executor import StageRun
from engine.parallel.failures import wait_all
from engine.pipeline.program import cached_program
from engine.pipeline.stage import glm_forward_step
from engine.pipeline.stats import SavedActivationMeter, ScheduleStats

if TYPE_CHECKING:
    from engine.parallel.state import ParallelState
    from engine.pipeline.p2p import P2P


@dataclass(frozen=True)
class StepContext:
    """One forward_backward call: what to run, on which chunks and data, over which
    communication, with which hooks and measurements (the module docstring)."""
    schedule: str
    chunks: list
    microbatches: list[dict]
    num_tokens: int
    comm: P2P | None = None
    state: ParallelState | None = None
    forward_only: bool = False
    no_sync: Callable[[], ContextManager] | None = None
    forward_step: Callable = glm_forward_step
    autocast: Callable[[], ContextManager] | None = None
    stats: ScheduleStats | None = None
    meter: SavedActivationMeter | None = None
    outputs: list | None = None
    scale_loss: Callable | None = None


def _reduce_loss(total: torch.Tensor, state, comm) -> float:
    """Step loss from the last stage to every rank: a SUM over the pipeline group (only
    the last stage holds a non-zero value), then a SUM over data parallel."""
    board = getattr(comm, "board", None)
    for size, group, ranks, name in ((state.dims.pp, state.pp_group, state.pp_ranks,
                                      "pipeline"),
                                     (state.dims.dp, state.dp_group, state.dp_ranks,
                                      "data-parallel")):
        if size > 1:
            work = dist.all_reduce(total, group=group, async_op=True)
            wait_all([work], state, f"the loss all-reduce over {name} ranks {ranks}",
                     [ranks], board)
    return float(total.item())


def forward_backward(step: StepContext) -> float:
    """Run one optimizer step's forwards (and backwards); see the module docstring."""
    schedule, chunks, microbatches = step.schedule, step.chunks, step.microbatches
    num_tokens, comm, state, forward_only = (step.num_tokens, step.comm, step.state,
                                             step.forward_only)
    meter = step.meter
    state = or_single(state, next(chunks[0].parameters()).device)
    if state is not step.state:   # the executor reads the state off the context
        step = dataclasses.replace(step, state=state)
    p, s = state.dims.pp, state.coords.pp
    v, m = len(chunks), len(microbatches)
    if state.distributed and v != state.dims.vpp:
        raise ValueError(f"got {v} model chunks but the layout has vpp={state.dims.vpp}")
    if forward_only and schedule == "none" and p > 1:
        schedule = "1f1b"  # the forward-only order does not depend on the schedule
    program = cached_program(schedule, p, s, m, v, forward_only)   # checks the layout
    if num_tokens <= 0 and not forward_only:
        raise ValueError(f"num_tokens={num_tokens} must be positive (labels != -100 over "
                         "the global batch)")
    if p > 1 and comm is None:
        raise ValueError(f"pp={p} needs a P2P object (engine.pipeline.p2p.P2P) as comm")
    device = state.device
    runner = StageRun
    if schedule == "zb-v":   # the V placement's executor (engine.pipeline.zbv)
        from engine.pipeline.zbv import VStageRun as runner
    run = runner(step, p, s, device)
    if comm is not None:
        # every stage raises the same ValueError on a disagreement, so nothing to report
        comm.begin_step(microbatches, m)
    try:
        with meter.hooks() if meter is not None else contextlib.nullcontext():
            total = run.run(program)
        return _reduce_loss(total, state, comm)
    except Exception as err:
        if comm is not None:
            comm.report_failure(err)
        raise
