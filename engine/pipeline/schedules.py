"""Pipeline schedules: no pipelining, GPipe, 1F1B, interleaved 1F1B, forward-only.

Entry point (engine/train/trainer.py calls it once per optimizer step):

    forward_backward(schedule: str, chunks: list[GLM], microbatches: list[dict],
                     num_tokens: int, comm: P2P | None = None,
                     state: ParallelState | None = None, forward_only: bool = False,
                     no_sync: Callable[[], ContextManager] | None = None,
                     forward_step=glm_forward_step, autocast=None,
                     stats: ScheduleStats | None = None,
                     meter: SavedActivationMeter | None = None,
                     outputs: list | None = None) -> float

    schedule      "none" (gradient accumulation, pp == 1), "gpipe", "1f1b", "interleaved"
                  (vpp >= 2, m a multiple of pp); forward_only ignores it
    chunks        this rank's model chunks, vpp of them (build_stage makes them)
    microbatches  this data-parallel rank's m batch dicts (model.masks.collate); every stage
                  gets all of them, but only the first stage reads input_ids and the side
                  tensors, only the last reads labels: the others use what they receive
    num_tokens    labels != -100 over the whole global batch (all dp ranks, all
                  microbatches), computed by the caller
    comm          engine.pipeline.p2p.P2P, or None when pp == 1
    state         engine.parallel.state.ParallelState, or None for a plain single process
    forward_only  no backward (evaluation, teacher inference); `outputs` then receives the
                  last stage's per-microbatch outputs (token losses [b, s] or logits)
    no_sync       () -> context manager (DDP-style); every backward but the last one of each
                  chunk runs inside it, so the data-parallel reduction happens once, during
                  the last backward of each chunk
    forward_step  (chunk, batch, hidden | None, Side) -> output; autocast wraps it
    stats, meter  optional measurements (ScheduleStats, SavedActivationMeter)
    returns       the step loss: sum over microbatches of token_losses.sum() / num_tokens,
                  all-reduced from the last stage over the pipeline and summed over dp:
                  the same float on every rank

Loss convention: each microbatch's loss is its summed token loss / num_tokens and
backward runs on that, so summing gradients over microbatches and then over dp ranks
gives exactly the gradients of single-process accumulation over the global batch.

How a schedule is built. `compute_order` lists one stage's forwards and backwards as
readable warmup / steady / cooldown blocks, in slots. `stage_program` adds communication
by one rule: between consecutive slots, ONE batched exchange that sends what the last
slot produced and receives what the next slot needs. For 1F1B (one op per slot) that
rule yields Megatron's send_forward_recv_backward after a steady-state forward and
send_backward_recv_forward after a steady-state backward: both neighbours post both
halves before waiting, so the steady state cannot deadlock. Interleaved 1F1B puts the
steady forward and backward in one slot (a four-way exchange), which the ring of stages
needs. `_StageRun` executes exactly that op list, and engine/pipeline/sim.py simulates
the same lists for every (p, m, vpp) to check the pairing of sends and receives, the
absence of deadlock, the bubble and the memory.

Activation deallocation: once a stage output has been sent downstream only its autograd
graph is needed, so its .data is swapped for a 1-element tensor; its backward restores
the shape by aliasing the incoming gradient and runs `torch.autograd.backward(output,
grad)`. Stage s of 1F1B therefore holds at most min(p - s, m) microbatches of
activations, and no dead copies of its outputs.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch.profiler import record_function

from engine.pipeline.p2p import Side, wait_all
from engine.pipeline.names import SCHEDULES, SPLIT_BACKWARD
from engine.train.timing import Clock

_KIND_NAMES = {"F": "forward", "B": "backward", "W": "weight-grad", "X": "exchange"}


# ---- the op lists ---------------------------------------------------------------------

@dataclass(frozen=True)
class Msg:
    """One point-to-point message. `chunk` is the local chunk the tensor belongs to: the
    producer for a send, the consumer for a receive. Activations flow to the next stage
    (and from the last stage back to stage 0 between interleaved chunks); gradients flow
    the other way."""
    op: str     # "send" | "recv"
    what: str   # "act" (hidden states + side tensors) | "grad"
    mb: int
    chunk: int

    @property
    def peer(self) -> str:
        downstream = (self.op == "send") == (self.what == "act")
        return "next" if downstream else "prev"

    def __str__(self):
        arrow = ">" if self.op == "send" else "<"
        return f"{self.op} {self.what} {self.mb}.{self.chunk} {arrow} {self.peer}"


@dataclass(frozen=True)
class Op:
    kind: str                   # "F" forward, "B" backward (input gradients only in the
    #                             split schedules), "W" weight gradients, "X" one batch of
    #                             transfers, posted without waiting
    mb: int = -1
    chunk: int = 0
    msgs: tuple[Msg, ...] = ()

    def __str__(self):
        if self.kind == "X":
            return "X[" + ", ".join(map(str, self.msgs)) + "]"
        return f"{self.kind}{self.mb}.{self.chunk}"


def check_schedule(schedule: str, p: int, m: int, v: int, forward_only: bool = False):
    """Clear errors for schedule / layout combinations that cannot run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} must be one of {', '.join(SCHEDULES)}")
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"need pp >= 1, microbatches >= 1, vpp >= 1; got pp={p}, m={m}, "
                         f"vpp={v}")
    if schedule == "none" and p != 1:
        raise ValueError(f"schedule='none' is gradient accumulation on one stage; pp={p} "
                         "needs 'gpipe', '1f1b', 'interleaved' or 'zb-h1'")
    if schedule == "interleaved":
        if v < 2 or p < 2:
            raise ValueError(f"schedule='interleaved' needs pp >= 2 and vpp >= 2 model chunks "
                             f"per stage; got pp={p}, vpp={v}")
        if m % p and not forward_only:
            raise ValueError(f"interleaved 1F1B needs the number of microbatches m={m} to be "
                             f"a multiple of pp={p}")
    elif v != 1:
        raise ValueError(f"schedule={schedule!r} runs one model chunk per stage; vpp={v} "
                         "needs schedule='interleaved'")


def _interleaved_forward(k: int, p: int, v: int) -> tuple[int, int]:
    """(microbatch, chunk) of a stage's k-th forward in interleaved order: groups of p
    microbatches go through chunk 0, then the same group through chunk 1, ..."""
    group, r = divmod(k, p * v)
    return group * p + r % p, r // p


def compute_order(schedule: str, p: int, s: int, m: int, v: int = 1,
                  forward_only: bool = False) -> list[list[tuple[str, int, int]]]:
    """Stage s's forwards and backwards in order, grouped in slots: a slot is one op, or
    the forward + backward pair of an interleaved steady-state step, which share their
    exchanges. Ops are ("F" | "B", microbatch, chunk)."""
    check_schedule(schedule, p, m, v, forward_only)
    F = lambda mb, c=0: [("F", mb, c)]  # noqa: E731
    B = lambda mb, c=0: [("B", mb, c)]  # noqa: E731
    W = lambda mb, c=0: [("W", mb, c)]  # noqa: E731

    if forward_only:
        # nothing waits for a backward: microbatches in groups of (up to) p go through
        # chunk 0, then the same group through chunk 1, ... (any m, any vpp)
        return [F(start + j, c) for start in range(0, m, p) for c in range(v)
                for j in range(min(p, m - start))]

    if schedule == "none":
        # gradient accumulation: each microbatch's activations die with its backward
        return [slot for i in range(m) for slot in (F(i), B(i))]

    if schedule == "gpipe":
        # all forwards, then all backwards: m microbatches of activations live at once
        return [F(i) for i in range(m)] + [B(i) for i in range(m)]

    if schedule == "1f1b":
        # warmup: stage s runs ahead by the p - s - 1 microbatches the stages after it
        # need before the first backward can come back (fewer when m is small)
        warmup = min(p - s - 1, m)
        order = [F(i) for i in range(warmup)]
        # steady state: one forward, one backward; in flight stays at warmup + 1 <= p - s.
        # Separate slots: the forward's output leaves with the receive of the backward's
        # gradient (send_forward_recv_backward), the backward's gradient with the receive
        # of the next input (send_backward_recv_forward).
        for i in range(m - warmup):
            order += [F(warmup + i), B(i)]
        # cooldown: drain the backwards of the warmup microbatches
        order += [B(i) for i in range(m - warmup, m)]
        return order

    if schedule == "zb-h1":
        # ZB-H1 (Qi et al. 2024): 1F1B's order and warmup, with each backward split into
        # B (input gradient: sent upstream at once) and W (weight gradient: local). A
        # gradient now travels upstream at B's cost instead of B + W's, which shortens the
        # warmup wait of stage s from (p-1-s)(t_B + t_W) to (p-1-s) t_B; in the cooldown
        # W fills the gaps between the gradients arriving. A microbatch's activations
        # live from F to its W, at most p - s of them: 1F1B's memory.
        # The last B of every stage waits for the one downstream, p - 1 - s hops of t_B
        # after the last stage's; for all stages to end together stage s leaves s + 1
        # W passes for after its last B. So W runs `lag` = s microbatches behind B,
        # which holds at most (p - s) + s = p microbatches (1F1B's stage 0, the peak).
        warmup = min(p - s - 1, m)
        lag = min(s, m - 1)
        order = [F(i) for i in range(warmup)]
        w = 0   # next W
        for i in range(m - warmup):
            order += [F(warmup + i), B(i)]
            if i >= lag:
                order.append(W(w))
                w += 1
        for i in range(m - warmup, m):
            order.append(B(i))
            if i >= lag:
                order.append(W(w))
                w += 1
        order += [W(j) for j in range(w, m)]
        return order

    # interleaved 1F1B (Megatron, Narayanan et al. 2021): m * v virtual microbatches.
    # Backwards visit chunks in reverse order (the gradient enters at the last chunk).
    total = m * v

    def fwd(k):
        return F(*_interleaved_forward(k, p, v))

    def bwd(k):
        mb, c = _interleaved_forward(k, p, v)
        return B(mb, v - 1 - c)

    # warmup: all chunks but the last fill first ((v - 1) * p forwards), plus twice the
    # distance to the last stage: a gradient needs p - s - 1 hops back for every hop the
    # activation took forward
    warmup = min(total, (p - s - 1) * 2 + (v - 1) * p)
    order = [fwd(k) for k in range(warmup)]
    # steady state: forward and backward in ONE slot. With a ring of stages, a stage's
    # gradient send and its next activation receive can involve the same neighbour in
    # both roles; posting all four transfers of a step as one batch (Megatron's
    # send_forward_backward_recv_forward_backward) is what keeps the ring deadlock-free
    # (pipeline_sim finds the deadlock for p=2, m=4, vpp=2 with separate slots).
    for i in range(total - warmup):
        order.append(fwd(warmup + i) + bwd(i))
    # cooldown
    order += [bwd(k) for k in range(total - warmup, total)]
    return order


def stage_program(schedule: str, p: int, s: int, m: int, v: int = 1,
                  forward_only: bool = False) -> list[Op]:
    """The exact op list stage s runs: the compute slots with one batch of transfers
    between consecutive ones (what the previous slot produced goes out, what the next
    slot needs comes in). A batch is posted without waiting: the executor waits on a
    receive just before the op that reads it, and on sends at the end of the step. Pure
    function: the executor and the simulator both run it."""
    return list(cached_program(schedule, p, s, m, v, forward_only))


@functools.lru_cache(maxsize=256)
def cached_program(schedule: str, p: int, s: int, m: int, v: int = 1,
                   forward_only: bool = False) -> tuple[Op, ...]:
    """stage_program, built and checked once per (schedule, p, s, m, v, forward_only)
    (an invalid combination raises every time: exceptions are not cached)."""
    return tuple(_build_program(schedule, p, s, m, v, forward_only))


def _build_program(schedule, p, s, m, v, forward_only) -> list[Op]:
    if not 0 <= s < p:
        raise ValueError(f"stage={s} is outside pp={p}")
    slots = compute_order(schedule, p, s, m, v, forward_only)
    first = lambda c: s == 0 and c == 0  # noqa: E731  (virtual stage 0: reads input_ids)
    last = lambda c: s == p - 1 and c == v - 1  # noqa: E731  (computes the loss)

    def needs(kind, mb, c):  # the message an op must receive before it can run (W: none)
        if kind == "F" and not first(c):
            return Msg("recv", "act", mb, c)
        if kind == "B" and not last(c):
            return Msg("recv", "grad", mb, c)
        return None

    def produces(kind, mb, c):  # the message an op's result goes out as
        if kind == "F" and not last(c):
            return Msg("send", "act", mb, c)
        if kind == "B" and not first(c):
            return Msg("send", "grad", mb, c)
        return None

    program: list[Op] = []
    for i in range(len(slots) + 1):
        msgs = [produces(*op) for op in (slots[i - 1] if i > 0 else [])]
        msgs += [needs(*op) for op in (slots[i] if i < len(slots) else [])]
        msgs = [x for x in msgs if x is not None]
        if msgs:
            # canonical order inside a batch: activation traffic before gradient traffic,
            # sends before receives. With pp == 2 and interleaving both directions share
            # one pair of ranks, and NCCL matches same-pair messages in posting order.
            msgs.sort(key=lambda x: (x.what != "act", x.op != "send"))
            program.append(Op("X", msgs=tuple(msgs)))
        if i < len(slots):
            program += [Op(*op) for op in slots[i]]
    return program


# ---- building a stage -----------------------------------------------------------------

def build_stage(config, pp: int, vpp: int, stage: int, seed: int = 0, device="cpu") -> list:
    """The vpp model chunks of one pipeline stage, initialised exactly like the same layers
    of the single-process model (init is per parameter name)."""
    from engine.parallel.state import stage_layers
    from model import GLM
    chunks = []
    for c in range(vpp):
        layers = stage_layers(config.num_layers, pp, vpp, stage, c)
        chunks.append(GLM.build(config, seed=seed, device=device, layer_range=layers,
                                pre_process=(stage == 0 and c == 0),
                                post_process=(stage == pp - 1 and c == vpp - 1)))
    return chunks


def glm_forward_step(chunk, batch: dict, hidden_states, side: Side):
    """Default forward step: input_ids on the first chunk, labels on the last (which then
    returns per-token losses [b, s]), hidden states [s, b, h] in between."""
    device = side.position_ids.device
    input_ids = batch["input_ids"].to(device) if chunk.pre_process else None
    labels = None
    if chunk.post_process and batch.get("labels") is not None:
        labels = batch["labels"].to(device)
    return chunk(input_ids, hidden_states=hidden_states, position_ids=side.position_ids,
                 block_position_ids=side.block_position_ids, prefix_lens=side.prefix_lens,
                 doc_starts=side.doc_starts, labels=labels)


# ---- measuring ------------------------------------------------------------------------

@dataclass
class ScheduleStats:
    """What one forward_backward call did on this rank (pass one in as `stats`)."""
    peak_in_flight: int = 0       # (microbatch, chunk) activations held for a backward
    compute_s: float = 0.0        # seconds in forward / backward
    comm_wait_s: float = 0.0      # seconds in exchanges: mostly waiting, i.e. the bubble
    outputs_freed: int = 0        # sent stage outputs whose .data was deallocated
    ops: list[str] = field(default_factory=list)   # the program as run, e.g. "F3.0"
    # (op, "compute" | "wait", start s, end s) from the step's start, device time
    timeline: list[tuple[str, str, float, float]] = field(default_factory=list)

    def record(self, clock, marks):
        """Add the ops measured by an engine.train.timing.Clock as (op, is an exchange, start
        mark, end mark, (start, end) marks of a receive waited on inside the op, or None);
        resolving them is this step's one synchronisation (CUDA events)."""
        if not marks:
            return
        origin = marks[0][2]
        for op, exchange, a, b, waited in marks:
            start, end = clock.seconds(origin, a), clock.seconds(origin, b)
            if exchange:
                self.comm_wait_s += end - start
                self.timeline.append((op, "wait", start, end))
                continue
            if waited is not None:   # the op began by waiting for its input
                w0, w1 = clock.seconds(origin, waited[0]), clock.seconds(origin, waited[1])
                self.comm_wait_s += w1 - w0
                self.timeline.append((op, "wait", w0, w1))
                start = w1
            self.compute_s += end - start
            self.timeline.append((op, "compute", start, end))


class SavedActivationMeter:
    """Live bytes kept for backward, via saved-tensor hooks: distinct storages (views
    share their base's bytes), parameters excluded, released when autograd frees the
    graph. The schedule also adds each stage output's bytes while it holds them, until
    the output is sent and its .data freed. `peak` is the maximum over the step.

        meter = SavedActivationMeter(model.parameters())
        forward_backward(..., meter=meter);  meter.peak
    """

    def __init__(self, params=()):
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self._live: dict[int, list[int]] = {}    # storage ptr -> [refcount, nbytes]
        self.current = 0
        self.peak = 0

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._param_ptrs or ptr == 0:
            return t
        entry = self._live.setdefault(ptr, [0, storage.nbytes()])
        if entry[0] == 0:
            self.add(entry[1])
        entry[0] += 1
        holder = _Saved(t)
        weakref.finalize(holder, self._release, ptr)
        return holder

    @staticmethod
    def _unpack(x):
        return x.t if isinstance(x, _Saved) else x

    def _release(self, ptr):
        entry = self._live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.add(-entry[1])
            del self._live[ptr]

    def add(self, nbytes: int):
        self.current += nbytes
        self.peak = max(self.peak, self.current)


class _Saved:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


# ---- the executor ---------------------------------------------------------------------

def _free_output(out: torch.Tensor):
    """Keep only the autograd graph of a sent output. Needs out._base is None (a view's
    .data cannot be swapped safely) and a grad_fn that does not read out itself (true for
    the residual add that ends every GLM block)."""
    if out._base is not None:
        raise RuntimeError("a stage output must not be a view to be deallocated")
    out.data = torch.empty((1,), device=out.device, dtype=out.dtype)


def _backward_freed(out: torch.Tensor, grad: torch.Tensor):
    # Give the freed output its shape back without allocating: alias the gradient (same
    # shape and dtype). autograd checks shapes only; out's values are never read.
    out.data = grad
    torch.autograd.backward(out, grad_tensors=grad)


class _StageRun:
    """Runs one stage's program for one step. Tensors are keyed by (microbatch, chunk)
    and dropped as soon as the program is past their last use. Transfers are posted
    without waiting (`P2P.post`): a receive is waited on by the op that reads it, sends
    at the end of the step (their buffers are never reused within it)."""

    def __init__(self, chunks, microbatches, num_tokens, comm, p, s, forward_only, no_sync,
                 forward_step, autocast, stats, meter, outputs, device, split=False):
        self.chunks, self.microbatches, self.num_tokens = chunks, microbatches, num_tokens
        self.comm, self.p, self.s, self.v = comm, p, s, len(chunks)
        self.forward_only, self.no_sync = forward_only, no_sync
        self.scale_loss = None      # fp16 dynamic loss scaling (forward_backward sets it)
        self.forward_step, self.autocast = forward_step, autocast or contextlib.nullcontext
        self.stats, self.meter, self.collect, self.device = stats, meter, outputs, device
        self.inputs: dict = {}      # received hidden states [s, b, h], leaves
        self.outputs: dict = {}     # stage output (graph only, once sent) or the loss
        self.out_sides: dict = {}   # Side to send along with an output
        self.in_grads: dict = {}    # gradient of an input, to send upstream
        self.recvs: dict = {}       # ("act" | "grad", mb, chunk) -> the Posted batch
        self.sends: list = []       # Posted batches whose sends are not known complete
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.stores = None
        if split and not forward_only:
            from engine.pipeline.split_backward import store_for
            self.stores = [store_for(c) for c in chunks]
            for st in self.stores:
                st.meter = meter

    def first(self, c):  # virtual stage 0: reads input_ids and the side tensors
        return self.s == 0 and c == 0

    def last(self, c):   # last virtual stage: reads labels, computes the loss
        return self.s == self.p - 1 and c == self.v - 1

    def run(self, program) -> torch.Tensor:
        # DP reduction only in the last backward (split: the last B and the last W) of
        # each chunk, so it overlaps with that backward
        synced = {}
        for i, op in enumerate(program):
            if op.kind in "BW":
                synced[(op.kind, op.chunk)] = i
        synced = set(synced.values())
        # gloo matches each transfer on its own (per peer and tag, in posting order), so
        # a receive can go out one exchange early and its data arrive during the compute
        # in between; NCCL runs a rank's batches in order, so there the program's own
        # batches (the ones pipeline_sim proves) are posted as they are
        exchanges = [i for i, op in enumerate(program) if op.kind == "X"]
        ahead = {}
        if self.comm is not None and getattr(self.comm.state, "backend", "gloo") != "nccl":
            ahead = {a: program[b].msgs for a, b in zip(exchanges, exchanges[1:])}
        self.clock = Clock(self.device) if self.stats is not None else None
        # (op name, is an exchange, start mark, end mark, receive-wait marks inside the op)
        marks = []
        for i, op in enumerate(program):
            t0 = self._mark()
            waited = None
            # a named range per op for torch.profiler traces (near-free when not profiling)
            with record_function(f"{_KIND_NAMES[op.kind]} stage{self.s} {op}"):
                if op.kind == "X":
                    self.exchange(op.msgs)
                    if i in ahead:
                        self.exchange(tuple(x for x in ahead[i] if x.op == "recv"))
                else:
                    sync_off = self.no_sync is not None and op.kind != "F" and i not in synced
                    with self.no_sync() if sync_off else contextlib.nullcontext():
                        if op.kind == "F":
                            waited = self.forward(op.mb, op.chunk)
                        elif op.kind == "B":
                            waited = self.backward(op.mb, op.chunk)
                        else:
                            self.stores[op.chunk].run((op.mb, op.chunk))
            if self.clock is not None:
                marks.append((str(op), op.kind == "X", t0, self._mark(), waited))
                self.stats.ops.append(str(op))
        t0 = self._mark()
        with record_function(f"exchange stage{self.s} wait sends"):
            for posted in self.sends:
                posted.wait_sends()
        self.sends = []
        if self.clock is not None:
            marks.append(("sends", True, t0, self._mark(), None))
            self.stats.record(self.clock, marks)
        left = [k for d in (self.inputs, self.outputs, self.in_grads, self.recvs) for k in d]
        left += [k for st in self.stores or () for k in st.pending]
        if left:  # cheap invariant; pipeline_sim proves the programs consume everything
            raise RuntimeError(f"stage {self.s}: the schedule left tensors behind for {left}")
        return self.total

    def _mark(self):
        return self.clock.mark() if self.clock is not None else None

    def _received(self, kind, mb, c):
        """Wait for a posted receive; returns (value, (start, end) marks of the wait) so
        that ScheduleStats counts it as waiting, not compute."""
        t0 = self._mark()
        posted = self.recvs.pop((kind, mb, c))
        value = posted.activation() if kind == "act" else posted.gradient()
        return value, (t0, self._mark())

    def forward(self, mb: int, c: int):
        batch = self.microbatches[mb]
        waited = None
        if self.first(c):
            side, x = Side.from_batch(batch, self.device), None
        else:
            (x, side), waited = self._received("act", mb, c)
            if not self.forward_only:
                x.requires_grad_(True)
                self.inputs[(mb, c)] = x
        grad_mode = torch.no_grad() if self.forward_only else contextlib.nullcontext()
        with grad_mode, self.autocast():
            out = self.forward_step(self.chunks[c], batch, x, side)
        if not self.last(c):
            self.outputs[(mb, c)] = out
            self.out_sides[(mb, c)] = side
            if self.meter is not None:
                self.meter.add(out.untyped_storage().nbytes())
        else:
            if self.collect is not None:
                self.collect.append(out.detach())
            if batch.get("labels") is not None:
                # fp32 per-token losses; the global token count makes microbatches and
                # dp ranks add up to the single-process mean
                loss = out.float().sum() / self.num_tokens
                self.total += loss.detach().double()
                if not self.forward_only:
                    self.outputs[(mb, c)] = loss
            elif not self.forward_only:
                raise ValueError(f"microbatch {mb} has no labels: forward_backward needs "
                                 "labels on the last stage")
        if self.stats is not None and not self.forward_only:
            held = len(self.outputs) + (len(self.stores[c].pending) if self.stores else 0)
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, held)
        return waited

    def backward(self, mb: int, c: int):
        out = self.outputs.pop((mb, c))
        waited = None
        split = (self.stores[c].backward_of((mb, c)) if self.stores is not None
                 else contextlib.nullcontext())
        with split:
            if self.last(c):
                # fp16: the loss scale multiplies the gradient at its root, so every
                # stage's gradients (and the ones sent upstream) are scaled alike
                torch.autograd.backward(self.scale_loss(out) if self.scale_loss else out)
            else:
                grad, waited = self._received("grad", mb, c)
                if self.meter is not None:   # what is left of the freed output: 1 element
                    self.meter.add(-out.untyped_storage().nbytes())
                _backward_freed(out, grad)
        del out
        if not self.first(c):
            self.in_grads[(mb, c)] = self.inputs.pop((mb, c)).grad
        if self.stores is not None:
            # B without linear layers (possible for a stage of norms only) needs no W;
            # keep the key so that the W op finds an (empty) entry
            self.stores[c].pending.setdefault((mb, c), [])
        return waited

    def exchange(self, msgs):
        send_next = send_prev = None
        recv_act = recv_grad = None
        sent_key = None
        for msg in msgs:
            key = (msg.mb, msg.chunk)
            if msg.op == "send" and msg.what == "act":
                send_next = (self.outputs[key].detach(), self.out_sides.pop(key))
                sent_key = key
            elif msg.op == "send":
                send_prev = self.in_grads.pop(key)
            elif ("act" if msg.what == "act" else "grad",) + key in self.recvs:
                continue    # posted one exchange early
            elif msg.what == "act":
                recv_act = key
            else:
                recv_grad = key
        if send_next is None and send_prev is None and recv_act is None and recv_grad is None:
            return
        posted = self.comm.post(send_next=send_next, send_prev=send_prev,
                                recv_prev=recv_act is not None,
                                recv_next=recv_grad is not None)
        if recv_act is not None:
            self.recvs[("act",) + recv_act] = posted
        if recv_grad is not None:
            self.recvs[("grad",) + recv_grad] = posted
        if send_next is not None or send_prev is not None:
            # drop batches whose sends finished: their buffers can go
            self.sends = [x for x in self.sends if not x.sends_done()]
            self.sends.append(posted)
        if sent_key is not None:
            out = self.outputs[sent_key] if not self.forward_only else \
                self.outputs.pop(sent_key)
            held = out.untyped_storage().nbytes()
            if not self.forward_only:
                # posted: only the graph is needed until the backward (module docstring);
                # the send keeps the values alive through its own reference until done
                _free_output(out)
                if self.stats is not None:
                    self.stats.outputs_freed += 1
            if self.meter is not None:   # forward-only: dropped; training: .data freed
                self.meter.add(-(held - (out.untyped_storage().nbytes()
                                         if not self.forward_only else 0)))


def _reduce_loss(total: torch.Tensor, state, comm) -> float:
    """Step loss from the last stage to every rank: a SUM over the pipeline group (only
    the last stage holds a non-zero value), then a SUM over data parallel."""
    if state is None:
        return float(total.item())
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


def forward_backward(schedule: str, chunks: list, microbatches: list[dict], num_tokens: int,
                     comm=None, state=None, forward_only: bool = False,
                     no_sync: Callable[[], ContextManager] | None = None,
                     forward_step: Callable = glm_forward_step,
                     autocast: Callable[[], ContextManager] | None = None,
                     stats: ScheduleStats | None = None,
                     meter: SavedActivationMeter | None = None,
                     outputs: list | None = None,
                     scale_loss: Callable | None = None) -> float:
    """Run one optimizer step's forwards (and backwards); see the module docstring.

    forward_step(chunk, batch, hidden_states | None, side) -> hidden [s, b, h], or on the
    last chunk per-token losses [b, s] (with labels) / logits. autocast: () -> context
    manager wrapped around each forward (e.g. bf16 autocast). stats / meter: optional
    measurements. outputs: a list that, on the last stage, receives each microbatch's
    output in order (forward-only evaluation and teacher inference). scale_loss: loss ->
    scaled loss, applied before the last stage's backward (fp16 dynamic loss scaling)."""
    p = state.dims.pp if state is not None else 1
    s = state.coords.pp if state is not None else 0
    v, m = len(chunks), len(microbatches)
    if state is not None and v != state.dims.vpp:
        raise ValueError(f"got {v} model chunks but the layout has vpp={state.dims.vpp}")
    if forward_only and schedule == "none" and p > 1:
        schedule = "1f1b"  # the forward-only order does not depend on the schedule
    program = cached_program(schedule, p, s, m, v, forward_only)   # checks the layout
    if num_tokens <= 0 and not forward_only:
        raise ValueError(f"num_tokens={num_tokens} must be positive (labels != -100 over "
                         "the global batch)")
    if p > 1 and comm is None:
        raise ValueError(f"pp={p} needs a P2P object (engine.pipeline.p2p.P2P) as comm")
    device = state.device if state is not None else next(chunks[0].parameters()).device
    run = _StageRun(chunks, microbatches, max(num_tokens, 1), comm, p, s, forward_only,
                    no_sync, forward_step, autocast, stats, meter, outputs, device,
                    split=schedule in SPLIT_BACKWARD)
    run.scale_loss = scale_loss
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
