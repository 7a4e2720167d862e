"""The schedule programs: for each stage, the exact list of compute ops and transfers it
runs in one step. Pure functions of (schedule, p, s, m, v, forward_only): the executor
(engine/pipeline/executor.py) and the simulator (engine/pipeline/sim.py) run the same
lists.

How a schedule is built. `compute_order` lists one stage's forwards and backwards as
readable warmup / steady / cooldown blocks, in slots. `stage_program` adds communication
by one rule: between consecutive slots, ONE batched exchange that sends what the last
slot produced and receives what the next slot needs. For 1F1B (one op per slot) that
rule yields Megatron's send_forward_recv_backward after a steady-state forward and
send_backward_recv_forward after a steady-state backward: both neighbours post both
halves before waiting, so the steady state cannot deadlock. Interleaved 1F1B puts the
steady forward and backward in one slot (a four-way exchange), which the ring of stages
needs. The executor runs exactly that op list, and engine/pipeline/sim.py simulates
the same lists for every (p, m, vpp) to check the pairing of sends and receives, the
absence of deadlock, the bubble and the memory.

`cached_program` builds (and checks) each program once per process: a training step
looks it up instead of rebuilding it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from engine.pipeline.names import SCHEDULES


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
    if schedule == "zb-v":   # engine.pipeline.zbv
        from engine.pipeline.zbv import check_zbv
        return check_zbv(p, m, v)
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
    if schedule == "zb-v":   # engine.pipeline.zbv: one op per slot
        from engine.pipeline import zbv
        return [[op] for op in zbv.compute_order(p, s, m, forward_only)]
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
    if schedule == "zb-v":   # the V placement's messages (engine.pipeline.zbv)
        from engine.pipeline import zbv
        check_schedule(schedule, p, m, v, forward_only)
        return zbv.build_program(p, s, m, Op, forward_only)
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
