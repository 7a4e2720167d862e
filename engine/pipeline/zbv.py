"""ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): two model chunks per
rank in a V (engine.pipeline.placement: chunk 0 of rank s is virtual stage s, chunk 1 is
2p - 1 - s), every backward split into B (input gradient) and W (weight gradient).

Why it reaches about zero bubble at 1F1B's memory: in the V the loss sits on rank 0,
where the first forward started, so the first gradient comes back to rank s after the
work of 2p - 1 - s virtual stages of forwards, all of which rank s can fill with its own
forwards; W ops fill what the B chain leaves, and the cooldown drains B before W so the
gradients reach the ranks that wait for them first.

Rank s's order, with unit F, B and W per chunk (the simulator's default costs):

  warmup    2(p - s) - 1 forwards of chunk 0: the time until microbatch 0 has gone down
            the ranks and come back up to rank s through chunk 1;
            s pairs (F chunk 1, F chunk 0): until microbatch 0's gradient, which starts
            at rank 0's loss, has come down chunk 1 to rank s;
            p - s triples (F, B, W) of chunk 1: the gradient is now flowing in
  steady    (F, B, W) of chunk 0 then (F, B, W) of chunk 1, while forwards remain;
            W right after its B keeps at most 2p chunk activations (p whole-stage
            microbatches: 1F1B's stage-0 peak) on every rank
  cooldown  s pairs (B chunk 0, B chunk 1), then p - s pairs (B chunk 0, W chunk 0):
            the B chain first, its W behind it; then every W left.

An op that its own rank's dependencies do not allow yet (fewer than 2p - 1 microbatches:
e.g. chunk 1's forward of a microbatch whose chunk-0 forward has not run) is skipped
where the block would place it, and a final drain appends whatever is left in dependency
order; the simulator checks the result for p 1..8 and m 1..32 (no deadlock under NCCL's
per-pair FIFO matching, bubble, memory). Communication follows the rule of
engine.pipeline.program.stage_program: one batch of transfers between consecutive ops,
sending what the previous op produced and receiving what the next op needs; the turn of
the V on rank p - 1 is a local hand-off with no message.
"""
from __future__ import annotations

import functools

from engine.pipeline.placement import VMsg, VPlacement


def check_zbv(p: int, m: int, v: int):
    if v != 2:
        raise ValueError(f"schedule='zb-v' places 2 model chunks per stage in a V; got "
                         f"vpp={v} (set parallel.vpp=2)")


def compute_order(p: int, s: int, m: int, forward_only: bool = False) -> list[tuple]:
    """Rank s's ops as ("F" | "B" | "W", microbatch, chunk), in order."""
    done = {(k, c): 0 for k in "FBW" for c in (0, 1)}   # how many of each ran
    order: list[tuple] = []

    def ready(kind, c) -> bool:
        i = done[(kind, c)]
        if i >= m:
            return False
        if kind == "F":   # chunk 1 reads what chunk 0 of the same microbatch produced
            return c == 0 or i < done[("F", 0)]
        if kind == "B":   # the gradient comes back through chunk 1 first
            return i < done[("F", 1)] if c == 1 else i < done[("B", 1)]
        return i < done[("B", c)]

    def run(*ops):
        for kind, c in ops:
            if ready(kind, c):
                order.append((kind, done[(kind, c)], c))
                done[(kind, c)] += 1

    # warmup
    run(*[("F", 0)] * (2 * (p - s) - 1))
    for _ in range(s):
        run(("F", 1), ("F", 0))
    if forward_only:
        while done[("F", 1)] < m:
            run(("F", 1), ("F", 0))
        return order
    for _ in range(p - s):
        run(("F", 1), ("B", 1), ("W", 1))
    # steady
    while done[("F", 0)] < m or done[("F", 1)] < m:
        run(("F", 0), ("B", 0), ("W", 0), ("F", 1), ("B", 1), ("W", 1))
    # cooldown
    for _ in range(s):
        run(("B", 0), ("B", 1))
    for _ in range(p - s):
        run(("B", 0), ("W", 0))
    while any(done[(k, c)] < m for k in "BW" for c in (0, 1)):
        run(("B", 1), ("B", 0), ("W", 1), ("W", 0))
    return order


def build_program(p: int, s: int, m: int, op_type, forward_only: bool = False) -> list:
    """Rank s's op list (op_type: program.Op): after each op a batch sends what it
    produced, and each receive goes into the batch `_receive_batches` chose for it."""
    ops = compute_order(p, s, m, forward_only)
    at = _receive_batches(p, m, forward_only)[s]
    before: dict = {}
    for key in sorted(at, key=at.get):
        before.setdefault(at[key][0], []).append(VMsg("recv", *key))
    program = []
    for i in range(len(ops) + 1):
        msgs = [_produces(p, s, *ops[i - 1])] if i > 0 else []
        msgs = [x for x in msgs if x is not None] + before.get(i, [])
        if msgs:
            program.append(op_type("X", msgs=tuple(msgs)))
        if i < len(ops):
            program.append(op_type(*ops[i]))
    return program


@functools.lru_cache(maxsize=64)
def _receive_batches(p: int, m: int, forward_only: bool) -> list[dict]:
    """Per rank: ("act" | "grad", mb, chunk) of each receive -> (batch, peer, position in
    the peer's sends), batch i being the one posted just before op i. Sends leave right
    after the op that produced them. A receive starts in the last batch that goes out
    before its message leaves, on the unit-cost time line (`_send_times`), and no later
    than its reader's: it completes as the message is sent, so the batches behind it
    (NCCL completes a rank's batches in order) are not held up and the sender's send
    finds its receive posted. Then it moves earlier only as far as two rules need,
    repeated until neither moves anything:

      FIFO  NCCL matches a pair's messages in posting order whatever their kind, so a
            receive is posted no later than the ones its sender sends after it (rank
            s + 1 sends chunk-0 activations and chunk-1 gradients to s interleaved in ITS
            order, e.g. a warmup forward before a first B);
      pairs when rank a sends X to b, and b sends Y to a in a batch before the one that
            receives X, a must have Y's receive posted by the batch sending X: else both
            sends wait for a receive that sits behind the other's send on its rank's
            stream (NCCL runs a rank's batches in order), a deadlock.

    The simulator then proves the result for p 1..8, m 1..32."""
    orders = [compute_order(p, q, m, forward_only) for q in range(p)]
    sent_at, ends = _send_times(p, orders)
    sends = [{} for _ in range(p)]   # rank -> {key: (peer, batch)} in send order
    recvs = [{} for _ in range(p)]   # rank -> {key: [batch, peer]}
    for q, ops in enumerate(orders):
        posted = [0.0] + ends[q]     # when batch i goes out: the end of op i - 1
        for i, op in enumerate(ops):
            out = _produces(p, q, *op)
            if out is not None:
                sends[q][(out.what, out.mb, out.chunk)] = (_peer(q, out), i + 1)
            need = _needs(p, q, *op)
            if need is not None:
                key = (need.what, need.mb, need.chunk)
                # the last batch out before the message leaves (unit costs): it then
                # completes just as the message is sent, holding up nothing behind it
                j = i
                while j > 0 and posted[j] > sent_at[_peer(q, need)][key]:
                    j -= 1
                recvs[q][key] = [j, _peer(q, need)]
    changed = True
    while changed:
        changed = False
        for a in range(p):
            for x, (b, sx) in sends[a].items():
                for y, (to, sy) in sends[b].items():
                    if to == a and sy < recvs[b][x][0] and recvs[a][y][0] > sx:
                        # the message sent first (unit costs) is received first
                        if sent_at[a][x] <= sent_at[b][y]:
                            recvs[b][x][0] = sy
                        else:
                            recvs[a][y][0] = sx
                        changed = True
        for q in range(p):
            for r in (q - 1, q + 1):
                if not 0 <= r < p:
                    continue
                latest = None
                for key in reversed([k for k, (to, _) in sends[q].items() if to == r]):
                    if latest is not None and recvs[r][key][0] > latest:
                        recvs[r][key][0] = latest
                        changed = True
                    latest = recvs[r][key][0]
    out = []
    for r in range(p):
        order = {}
        for q in (r - 1, r + 1):
            if 0 <= q < p:
                for n, k in enumerate(k for k, (to, _) in sends[q].items() if to == r):
                    order[k] = (q, n)
        if set(order) != set(recvs[r]):
            raise AssertionError(f"zb-v rank {r}: receives and sends disagree")
        out.append({k: (recvs[r][k][0],) + order[k] for k in recvs[r]})
    return out


def _send_times(p: int, orders) -> list[dict]:
    """When each message leaves (the end of its producer) with unit F, B, W and free
    communication: (rank -> {key: time}, rank -> [end time of each op])."""
    pc, clock = [0] * p, [0.0] * p
    out = [{} for _ in range(p)]
    ends = [[] for _ in range(p)]   # rank -> end time of each op
    arrived = [{} for _ in range(p)]
    moved = True
    while moved:
        moved = False
        for q in range(p):
            while pc[q] < len(orders[q]):
                kind, mb, c = op = orders[q][pc[q]]
                need = _needs(p, q, *op)
                start = clock[q]
                if need is not None:
                    key = (need.what, mb, c)
                    if key not in arrived[q]:
                        break
                    start = max(start, arrived[q][key])
                clock[q] = start + 1.0
                ends[q].append(clock[q])
                sent = _produces(p, q, *op)
                if sent is not None:
                    key = (sent.what, mb, c)
                    out[q][key] = clock[q]
                    arrived[_peer(q, sent)][key] = clock[q]
                pc[q] += 1
                moved = True
    return out, ends


def _peer(s: int, msg) -> int:
    return s + (1 if msg.peer == "next" else -1)


def _local_output(p: int, s: int, c: int) -> bool:
    # chunk 0 of the last rank feeds chunk 1 of the same rank (the V's turn)
    return c == 0 and s == p - 1


def _needs(p: int, s: int, kind: str, mb: int, c: int):
    """The message an op must receive before it runs (W: none)."""
    place = VPlacement(p)
    if kind == "F" and not place.first(s, c) and not place.local_input(s, c):
        return VMsg("recv", "act", mb, c)
    if kind == "B" and not place.last(s, c) and not _local_output(p, s, c):
        return VMsg("recv", "grad", mb, c)
    return None


def _produces(p: int, s: int, kind: str, mb: int, c: int):
    """The message an op's result goes out as."""
    place = VPlacement(p)
    if kind == "F" and not place.last(s, c) and not _local_output(p, s, c):
        return VMsg("send", "act", mb, c)
    if kind == "B" and not place.first(s, c) and not place.local_input(s, c):
        return VMsg("send", "grad", mb, c)
    return None


# ---- the executor ------------------------------------------------------------------

def _stage_run_base():
    from engine.pipeline.executor import StageRun
    return StageRun


class VStageRun(_stage_run_base()):
    """engine.pipeline.executor's StageRun for the V placement: first / last virtual
    stage by the V, the turn on the last rank as a local hand-off (chunk 1 reads chunk
    0's output, chunk 0's backward reads chunk 1's input gradient, no message), and
    batches posted by placement.post, whose messages go either way."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.place = VPlacement(self.p)

    def first(self, c):
        return self.place.first(self.s, c)

    def last(self, c):
        return self.place.last(self.s, c)

    def _received(self, kind, mb, c):
        if kind == "act" and self.place.local_input(self.s, c):
            from engine.pipeline.executor import _free_output
            key = (mb, c - 1)
            out = self.outputs.pop(key) if self.forward_only else self.outputs[key]
            held = out.untyped_storage().nbytes()
            x = out.detach()   # chunk 1's input shares the storage: no copy
            if not self.forward_only:
                _free_output(out)
            if self.meter is not None:
                self.meter.add(-(held - (0 if self.forward_only else
                                         out.untyped_storage().nbytes())))
            return (x, self.out_sides.pop(key)), None
        if kind == "grad" and c + 1 < self.v and self.place.local_input(self.s, c + 1):
            return self.in_grads.pop((mb, c + 1)), None
        return super()._received(kind, mb, c)

    def exchange(self, msgs):
        from engine.pipeline.placement import post
        from engine.pipeline.executor import _free_output
        msgs = [x for x in msgs if x.op == "send" or (x.what, x.mb, x.chunk) not in self.recvs]
        if not msgs:
            return
        sent = [(x.mb, x.chunk) for x in msgs if x.op == "send" and x.what == "act"]
        sends, received = post(self.comm, msgs, self.outputs, self.out_sides, self.in_grads)
        self.recvs.update(received)
        if sends is not None:
            self.sends = [x for x in self.sends if not x.sends_done()]
            self.sends.append(sends)
        for key in sent:   # as the base executor: keep only the graph of a sent output
            out = self.outputs[key] if not self.forward_only else self.outputs.pop(key)
            held = out.untyped_storage().nbytes()
            if not self.forward_only:
                _free_output(out)
                if self.stats is not None:
                    self.stats.outputs_freed += 1
            if self.meter is not None:
                self.meter.add(-(held - (out.untyped_storage().nbytes()
                                         if not self.forward_only else 0)))
