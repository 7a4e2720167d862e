"""Pure-Python pipeline simulator: runs the programs engine.pipeline.program builds, without
processes, and checks them.

For every stage it takes `stage_program(...)` (the exact op list the executor runs) and
plays all stages together with the blocking semantics of batched P2P:

  * an exchange (X) posts its messages as one batch and does not block; the stage blocks
    only in the op that reads a received tensor, until the batch carrying it completed,
    and at the end of the step until all its sends completed;
  * each rank's batches complete in posting order (one ordered communication stream per
    rank, as NCCL runs grouped P2P: a batch starts matching only once the rank's earlier
    batches are done), a batch completes when every message in it is matched;
  * messages between two ranks match first-in first-out per (sender, receiver) pair,
    regardless of kind (NCCL's rule, stricter than gloo's per-tag matching), and a send
    completes only when its receive is posted (rendezvous: no buffering assumed, which
    is the worst case for deadlock);
  * a matched pair must agree on what it carries (activation or gradient, microbatch,
    virtual stage), so a mis-ordered program is an error, not silent corruption.

It reports a deadlock (with what each blocked stage waits for), every microbatch's
forward preceding its backward and every activation being consumed, the time line with
unit cost per forward and `t_b` per backward (split evenly across a stage's chunks;
communication free; in the split schedules B costs t_b - t_w and W t_w), the bubble
fraction (idle / total stage time) and the peak number
of (microbatch, chunk) activations each stage holds for backward.

    python -m engine.pipeline.sim              # the full grid, one line per schedule
    python -m engine.pipeline.sim 1f1b 4 8     # one case, with per-stage details
    python -m engine.pipeline.sim --draw zb-h1 -p 4 -m 8 [--vpp V] [-o FILE.png]
                                               # the time line as a PNG (engine.pipeline.draw)
    python -m engine.pipeline.sim zb-v 4 8     # ZB-V: two chunks per rank (vpp 2 default)
"""
from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass

from engine.pipeline.names import SCHEDULES
from engine.pipeline.placement import V_SCHEDULES, Placement, placement_for
from engine.pipeline.program import Op, check_schedule, stage_program


class ScheduleError(RuntimeError):
    """A program that would deadlock, mismatch messages, or misuse activations."""


@dataclass
class SimResult:
    schedule: str
    p: int
    m: int
    v: int
    makespan: float
    busy: list[float]           # compute time per stage
    peak_in_flight: list[int]   # per stage, (microbatch, chunk) activations held
    ops: list[int]              # program length per stage
    timeline: list = None       # per stage: (kind, mb, chunk, start, end) of each compute op

    @property
    def bubble(self) -> float:
        """Fraction of all stage-time spent idle: 1 - sum(busy) / (p * makespan)."""
        return 1.0 - sum(self.busy) / (self.p * self.makespan) if self.makespan else 0.0


def expected_bubble(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Textbook bubble fractions (idle / total), forward:backward cost ratio free; for
    ZB-H1 with t_F = t_B = t_W (the simulator's default t_b = 2 split in halves) and
    m >= p: (p-1) / (3m + p-1), about (p-1) / 3m (Qi et al. 2024)."""
    if schedule == "none" or p == 1:
        return 0.0
    if schedule == "zb-h1":
        return (p - 1) / (3 * m + p - 1)
    if schedule == "zb-v":
        # m >= 2p - 1, unit F, B, W per chunk: the step takes 6m + p - 1 units, each
        # rank's 6m of work and p - 1 idle (its start offset s, and p - 1 - s of drain:
        # the last rank cannot start before the activations reach it)
        return (p - 1) / (6 * m + p - 1)
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (m + p - 1)


def _identity(stage: int, msg, p: int, place):
    """What a message carries, the same on both ends: (kind, microbatch, producer
    virtual stage) for activations, (kind, microbatch, consumer virtual stage) for
    gradients (virtual stage of chunk c on stage s: engine.pipeline.placement)."""
    vstage = place.virtual(stage, msg.chunk)
    if msg.what == "act":
        return ("act", msg.mb, vstage if msg.op == "send" else vstage - 1)
    return ("grad", msg.mb, vstage - 1 if msg.op == "send" else vstage)


def simulate(programs: list[list[Op]], p: int, v: int = 1, t_f: float = 1.0,
             t_b: float = 2.0, schedule: str = "?", m: int = 0,
             t_w: float | None = None, place=None, costs: dict | None = None) -> SimResult:
    """Play every stage's program; raise ScheduleError on any violation. A backward
    costs t_b; in a program with W ops, B costs t_b - t_w and W t_w (default t_b / 2).
    place: where the chunks sit (engine.pipeline.placement; default the loop).
    costs: measured op times instead, {(stage, chunk): {"F": s, "B": s, "W": s}} (e.g.
    from ScheduleStats.op_seconds of a real step): the step this program would take with
    those compute times and free transfers, to hold a measured step against."""
    place = place or Placement(p, v)
    n = len(programs)
    if n != p:
        raise ValueError(f"got {n} programs for p={p}")
    split = any(op.kind == "W" for prog in programs for op in prog)
    t_w = (t_b / 2 if t_w is None else t_w) if split else 0.0
    unit = {"F": t_f / v, "B": (t_b - t_w) / v, "W": t_w / v}

    def cost(s, op):
        return unit[op.kind] if costs is None else costs[(s, op.chunk)][op.kind]
    pc, clock, busy = [0] * p, [0.0] * p, [0.0] * p
    # every posted batch, per stage in posting order: its messages as (chan, kind, idx),
    # the time it was posted, and the time it completed (None while pending)
    batches: list[list[dict]] = [[] for _ in range(p)]
    queues: dict = defaultdict(lambda: {"send": [], "recv": []})  # chan -> [(id, s, k)]
    alive: list[set] = [set() for _ in range(p)]   # (mb, chunk) forwarded, not released
    backwarded: list[set] = [set() for _ in range(p)]
    b_done: list[set] = [set() for _ in range(p)]   # every (mb, chunk) whose B ran
    recv_in: list[dict] = [{} for _ in range(p)]   # what a posted receive carries -> batch
    done_f: list[set] = [set() for _ in range(p)]
    peak = [0] * p
    has_backward = [any(op.kind == "B" for op in prog) for prog in programs]
    timeline: list[list] = [[] for _ in range(p)]

    def peer_stage(s, msg):
        return (s + 1) % p if msg.peer == "next" else (s - 1) % p

    def active_since(s, k):
        """When batch k of stage s starts matching: posted, and every earlier batch of
        the stage complete (one ordered stream per rank, NCCL's rule); None if not yet."""
        if k > 0 and batches[s][k - 1]["done"] is None:
            return None
        return max(batches[s][k]["posted"], batches[s][k - 1]["done"] if k else 0.0)

    def settle() -> bool:
        """Complete every batch whose messages all have an active counterpart."""
        changed = False
        again = True
        while again:
            again = False
            for s in range(p):
                for k, batch in enumerate(batches[s]):
                    if batch["done"] is not None:
                        continue
                    start = active_since(s, k)
                    if start is None:
                        break
                    finish = start
                    for chan, kind, idx in batch["msgs"]:
                        other = queues[chan]["recv" if kind == "send" else "send"]
                        if len(other) <= idx:
                            break
                        _, o_stage, o_k = other[idx]
                        o_start = active_since(o_stage, o_k)
                        if o_start is None:
                            break
                        finish = max(finish, o_start)
                    else:
                        for chan, kind, idx in batch["msgs"]:
                            mine = queues[chan][kind][idx][0]
                            theirs = queues[chan]["recv" if kind == "send" else "send"][idx][0]
                            if mine != theirs:
                                raise ScheduleError(
                                    f"message order mismatch on stages {chan[0]}->{chan[1]}, "
                                    f"message #{idx}: stage {s} {kind}s {mine}, the peer has "
                                    f"{theirs}")
                        batch["done"] = finish
                        changed = again = True
                    if batch["done"] is None:
                        break
        return changed

    def wait_for(s, tag) -> bool:
        """Block stage s until the batch carrying receive `tag` completed."""
        k = recv_in[s].get(tag)
        if k is None:
            raise ScheduleError(f"stage {s}: needs {tag} but never posted its receive")
        done = batches[s][k]["done"]
        if done is None:
            return False
        clock[s] = max(clock[s], done)
        del recv_in[s][tag]
        return True

    def step(s) -> bool:
        """Advance stage s as far as it can go; True if it moved."""
        moved = False
        prog = programs[s]
        while pc[s] < len(prog):
            op = prog[pc[s]]
            key = (op.mb, op.chunk)
            first, last = place.first(s, op.chunk), place.last(s, op.chunk)
            # the V's turn: chunk 1 of the last rank reads chunk 0's output in place, and
            # hands chunk 0 its gradient the same way
            local_in = place.local_input(s, op.chunk)
            local_out = op.chunk + 1 < v and place.local_input(s, op.chunk + 1)
            if op.kind == "F" and local_in:
                if (op.mb, op.chunk - 1) not in done_f[s]:
                    raise ScheduleError(f"stage {s}: F{op.mb}.{op.chunk} before the local "
                                        f"F{op.mb}.{op.chunk - 1} it reads")
            if op.kind == "B" and local_out:
                if (op.mb, op.chunk + 1) not in b_done[s]:
                    raise ScheduleError(f"stage {s}: B{op.mb}.{op.chunk} before the local "
                                        f"B{op.mb}.{op.chunk + 1} it reads")
            if op.kind == "F":
                if not first and not local_in and not wait_for(s, ("act",) + key):
                    return moved
                c = cost(s, op)
                timeline[s].append(("F", op.mb, op.chunk, clock[s], clock[s] + c))
                clock[s] += c
                busy[s] += c
                done_f[s].add(key)
                if has_backward[s]:
                    alive[s].add(key)
                    peak[s] = max(peak[s], len(alive[s]))
            elif op.kind == "B":
                if key not in alive[s] or key in backwarded[s]:
                    raise ScheduleError(f"stage {s}: B{op.mb}.{op.chunk} without its forward")
                if not last and not local_out and not wait_for(s, ("grad",) + key):
                    return moved
                b_done[s].add(key)
                c = cost(s, op)
                timeline[s].append(("B", op.mb, op.chunk, clock[s], clock[s] + c))
                clock[s] += c
                busy[s] += c
                if split:
                    backwarded[s].add(key)
                else:
                    alive[s].discard(key)
            elif op.kind == "W":
                if key not in backwarded[s]:
                    raise ScheduleError(f"stage {s}: W{op.mb}.{op.chunk} before its B")
                backwarded[s].discard(key)
                alive[s].discard(key)
                c = cost(s, op)
                timeline[s].append(("W", op.mb, op.chunk, clock[s], clock[s] + c))
                clock[s] += c
                busy[s] += c
            else:   # post the batch; nobody waits here
                k = len(batches[s])
                batch = {"msgs": [], "posted": clock[s], "done": None}
                for msg in op.msgs:
                    other = peer_stage(s, msg)
                    chan = (s, other) if msg.op == "send" else (other, s)
                    q = queues[chan][msg.op]
                    q.append((_identity(s, msg, p, place), s, k))
                    batch["msgs"].append((chan, msg.op, len(q) - 1))
                    mkey = (msg.mb, msg.chunk)
                    if msg.op == "send" and msg.what == "act" and mkey not in done_f[s]:
                        raise ScheduleError(f"stage {s}: sends activation {msg.mb}.{msg.chunk} "
                                            "before computing it")
                    if msg.op == "send" and msg.what == "grad" and split and \
                            mkey not in backwarded[s]:
                        raise ScheduleError(f"stage {s}: sends gradient {msg.mb}.{msg.chunk} "
                                            "before its B")
                    if msg.op == "recv":
                        recv_in[s][(msg.what, msg.mb, msg.chunk)] = k
                batches[s].append(batch)
            pc[s] += 1
            moved = True
        return moved

    while True:
        moved = any([step(s) for s in range(p)])
        settled = settle()
        if all(pc[s] == len(programs[s]) for s in range(p)) and \
                all(b["done"] is not None for bs in batches for b in bs):
            break
        if not moved and not settled:
            waits = {s: str(programs[s][pc[s]]) if pc[s] < len(programs[s]) else
                     "the end of the step (its sends)" for s in range(p)
                     if pc[s] < len(programs[s]) or any(b["done"] is None for b in batches[s])}
            raise ScheduleError(f"deadlock ({schedule}, p={p}, m={m}, vpp={v}): blocked "
                                f"stages wait in {waits}")
    for s in range(p):
        # the step ends when this stage's last send has gone
        clock[s] = max([clock[s]] + [b["done"] for b in batches[s]])
        if alive[s] or recv_in[s]:
            raise ScheduleError(f"stage {s} ends with activations never backwarded "
                                f"{sorted(alive[s])} or unused messages {sorted(recv_in[s])}")
    return SimResult(schedule, p, m, v, max(clock), busy, peak, [len(x) for x in programs],
                     timeline)


def simulate_schedule(schedule: str, p: int, m: int, v: int = 1, t_f: float = 1.0,
                      t_b: float = 2.0, forward_only: bool = False) -> SimResult:
    """Generate every stage's program with engine.pipeline.program and simulate them together."""
    programs = [stage_program(schedule, p, s, m, v, forward_only) for s in range(p)]
    return simulate(programs, p, v, t_f, t_b, schedule, m, place=placement_for(schedule, p, v))


def simulate_measured(schedule: str, p: int, m: int, v: int,
                      per_rank: list[dict]) -> tuple[float, list[float]]:
    """(step, idle fraction per stage) of the schedule's programs played with measured op
    times, per_rank[s] = {(chunk, "F" | "B" | "W"): seconds} (ScheduleStats.op_seconds
    means), transfers free: what the schedule itself costs on that stage split,
    imbalance included, with communication and executor overhead taken out."""
    costs = {(s, c): {k: per_rank[s].get((c, k), 0.0) for k in "FBW"}
             for s in range(p) for c in range(v)}
    programs = [stage_program(schedule, p, s, m, v) for s in range(p)]
    res = simulate(programs, p, v, schedule=schedule, m=m,
                   place=placement_for(schedule, p, v), costs=costs)
    return res.makespan, [1.0 - b / res.makespan for b in res.busy]


def grid(p_max: int = 8, m_max: int = 32, v_max: int = 4):
    """Every valid (schedule, p, m, vpp) of the test grid, forward-only included."""
    for schedule in SCHEDULES:
        for p in range(1, p_max + 1):
            for v in range(1, v_max + 1):
                for m in range(1, m_max + 1):
                    for forward_only in (False, True):
                        try:
                            check_schedule(schedule, p, m, v, forward_only)
                        except ValueError:
                            continue
                        yield schedule, p, m, v, forward_only


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--draw":
        import argparse

        from engine.pipeline.draw import draw_png
        ap = argparse.ArgumentParser(prog="python -m engine.pipeline.sim --draw")
        ap.add_argument("schedule")
        ap.add_argument("-p", type=int, required=True)
        ap.add_argument("-m", type=int, required=True)
        ap.add_argument("--vpp", type=int, default=None,
                        help="model chunks per rank (default: 2 for zb-v, else 1)")
        ap.add_argument("-o", "--out", default="")
        a = ap.parse_args(argv[1:])
        a.vpp = a.vpp or (2 if a.schedule in V_SCHEDULES else 1)
        r = simulate_schedule(a.schedule, a.p, a.m, a.vpp)
        out = a.out or f"{a.schedule}_p{a.p}_m{a.m}.png"
        draw_png(r, out)
        print(f"wrote {out}: {a.schedule} p={a.p} m={a.m} vpp={a.vpp}, makespan "
              f"{r.makespan:g}, bubble {r.bubble:.3f} (rows = ranks; blue F, green B, "
              "orange W, white idle)")
        return 0
    if argv:
        schedule, p, m = argv[0], int(argv[1]), int(argv[2])
        v = int(argv[3]) if len(argv) > 3 else (2 if schedule in V_SCHEDULES else 1)
        r = simulate_schedule(schedule, p, m, v)
        print(f"{schedule} p={p} m={m} vpp={v}: makespan {r.makespan:g}, bubble "
              f"{r.bubble:.4f} (textbook {expected_bubble(schedule, p, m, v):.4f})")
        for s in range(p):
            print(f"  stage {s}: {r.ops[s]} ops, peak in flight {r.peak_in_flight[s]}")
            print("   ", " ".join(map(str, stage_program(schedule, p, s, m, v))))
        return 0
    counts: dict = defaultdict(int)
    worst: dict = defaultdict(float)
    for schedule, p, m, v, fo in grid():
        r = simulate_schedule(schedule, p, m, v, forward_only=fo)
        name = schedule + (" (forward-only)" if fo else "")
        counts[name] += 1
        # ZB-H1's formula needs m >= p, ZB-V's m >= 2p - 1
        if not fo and (schedule != "zb-h1" or m >= p) and (schedule != "zb-v" or m >= 2 * p - 1):
            worst[name] = max(worst[name], abs(r.bubble - expected_bubble(schedule, p, m, v)))
    for name, n in counts.items():
        extra = f", max |bubble - textbook| {worst[name]:.2e}" if name in worst else ""
        print(f"{name:28s} {n:5d} cases, no deadlock, orders match{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
