"""Where the model chunks of a pipeline sit: which virtual stage (slice of layers) chunk c
of stage s holds, and which way its activations and gradients travel.

Two placements:

  loop  chunk c of stage s is virtual stage c * p + s (interleaved 1F1B, and every
        one-chunk schedule): activations go to the next rank, around the ring from the
        last stage back to stage 0 between chunks; gradients go the other way.
  V     two chunks, chunk 0 of stage s is virtual stage s, chunk 1 is 2p - 1 - s (ZB-V,
        Qi et al. 2024): activations go down the ranks through chunk 0 and back up
        through chunk 1, so the first and the last virtual stage (embedding and loss head)
        are both on stage 0 and the turn (virtual p - 1 -> p) is on stage p - 1 itself:
        a local hand-off, no message. Chunk 1's traffic runs the opposite way to
        chunk 0's: activations to the previous rank, gradients to the next.

`placement_for(schedule, p, v)` picks one; build_stage, the ZB-V program and the simulator
ask it. `layers` gives a chunk's layer range under parallel.layer_split: the split counts
virtual stages, so for the V its counts run down the ranks and back up. `post` is P2P.post
for messages of either direction (engine.pipeline.p2p only sends activations forward and
gradients backward).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.parallel.split import layer_ranges

# the schedules whose chunks sit in a V (the one-line registration)
V_SCHEDULES = ("zb-v",)


class Placement:
    """Loop placement (the default)."""
    name = "loop"

    def __init__(self, p: int, v: int):
        self.p, self.v = p, v

    def virtual(self, s: int, c: int) -> int:
        return c * self.p + s

    def first(self, s: int, c: int) -> bool:   # reads input_ids (the embedding)
        return self.virtual(s, c) == 0

    def last(self, s: int, c: int) -> bool:    # computes the loss (norm + head)
        return self.virtual(s, c) == self.p * self.v - 1

    def local_input(self, s: int, c: int) -> bool:
        """The activation (c) reads, and so the gradient it returns, stays on stage s."""
        return False

    def layers(self, num_layers: int, s: int, c: int, split="even") -> tuple[int, int]:
        """[start, end) of chunk c of stage s; split: parallel.layer_split, "even" or the
        counts of each virtual stage (engine/parallel/split.py)."""
        if not 0 <= s < self.p or not 0 <= c < self.v:
            raise ValueError(f"stage={s}, chunk={c} is outside pp={self.p}, vpp={self.v}")
        return layer_ranges(num_layers, self.p * self.v, split)[self.virtual(s, c)]


class VPlacement(Placement):
    name = "v"

    def __init__(self, p: int, v: int = 2):
        if v != 2:
            raise ValueError(f"the V placement has 2 model chunks per stage; got vpp={v}")
        super().__init__(p, v)

    def virtual(self, s: int, c: int) -> int:
        return s if c == 0 else 2 * self.p - 1 - s

    def local_input(self, s: int, c: int) -> bool:
        return c == 1 and s == self.p - 1


def placement_for(schedule: str | None, p: int, v: int) -> Placement:
    return VPlacement(p, v) if schedule in V_SCHEDULES else Placement(p, v)


def holds_head(schedule: str | None, p: int, stage: int) -> bool:
    """Whether `stage` holds the final norm, the output head and the loss (the planner's
    memory and time models): the last stage, or stage 0 in the V."""
    return stage == 0 if schedule in V_SCHEDULES else stage == p - 1


@dataclass(frozen=True)
class VMsg:
    """A message of the V placement (the same fields as schedules.Msg): chunk 1 runs up
    the ranks, so its activations go to the previous rank and its gradients to the next."""
    op: str     # "send" | "recv"
    what: str   # "act" | "grad"
    mb: int
    chunk: int

    @property
    def peer(self) -> str:
        downstream = (self.op == "send") == (self.what == "act")
        if self.chunk == 1:
            downstream = not downstream
        return "next" if downstream else "prev"

    def virtual_stage(self, s: int, p: int) -> int:
        return VPlacement(p).virtual(s, self.chunk)

    def __str__(self):
        arrow = ">" if self.op == "send" else "<"
        return f"{self.op} {self.what} {self.mb}.{self.chunk} {arrow} {self.peer}"


def post(comm, msgs, outputs: dict, sides: dict, in_grads: dict):
    """Post `msgs` (VMsg, in program order: NCCL matches a pair's messages in posting
    order, which the simulator checks) as ONE batch; returns (a Posted for its sends or
    None, {("act" | "grad", mb, chunk): a Posted for that receive}), so that each
    receive is waited on by the op that reads it. Tags as P2P's: gloo matches per
    (sender, receiver, tag), and each direction between two ranks carries one
    activation and one gradient stream, each in microbatch order."""
    import torch
    import torch.distributed as dist

    from engine.pipeline.p2p import TAG_ACT, TAG_GRAD, TAG_SIDE, Posted, Side
    from engine.parallel.failures import peer_error
    if comm.shape is None:
        raise RuntimeError("placement.post before begin_step: shapes are not agreed yet")
    s, b = comm.shape
    full = (s // comm.seq_shards, b, comm.hidden_size)
    ops, peers, owner, what, sent = [], [], [], [], []
    buffers = {}   # receive key -> (act, side) | grad

    def add(fn, tensor, peer, tag, key):
        ops.append(dist.P2POp(fn, tensor, peer, comm.group, tag))
        peers.append(peer)
        owner.append(key)   # None: a send

    for msg in msgs:
        peer = comm.next if msg.peer == "next" else comm.prev
        key = (msg.mb, msg.chunk)
        if msg.op == "send" and msg.what == "act":
            hidden, side = outputs[key].detach(), sides.pop(key)
            comm._check(hidden, full, "activation to send")
            sent += [hidden.to(comm.wire_dtype).contiguous(), side.pack()]
            add(dist.isend, sent[-2], peer, TAG_ACT, None)
            add(dist.isend, sent[-1], peer, TAG_SIDE, None)
            what.append("send activations")
        elif msg.op == "send":
            g = in_grads.pop(key)
            comm._check(g, full, "gradient to send")
            sent.append(g.to(comm.wire_dtype).contiguous())
            add(dist.isend, sent[-1], peer, TAG_GRAD, None)
            what.append("send gradients")
        elif msg.what == "act":
            act = torch.empty(full, dtype=comm.wire_dtype, device=comm.device)
            side_buf = torch.empty(Side.numel(s, b), dtype=torch.long, device=comm.device)
            buffers[("act",) + key] = (act, side_buf)
            add(dist.irecv, act, peer, TAG_ACT, ("act",) + key)
            add(dist.irecv, side_buf, peer, TAG_SIDE, ("act",) + key)
            what.append("receive activations")
        else:
            grad = torch.empty(full, dtype=comm.wire_dtype, device=comm.device)
            buffers[("grad",) + key] = grad
            add(dist.irecv, grad, peer, TAG_GRAD, ("grad",) + key)
            what.append("receive gradients")
    label = " + ".join(what)
    try:
        works = dist.batch_isend_irecv(ops)
    except Exception as err:  # noqa: BLE001 - a peer already gone fails at post time
        raise peer_error(comm.state, label, peers[0] if len(set(peers)) == 1 else peers, err,
                         comm.board, 0.0, comm.timeout) from err
    coalesced = len(works) != len(ops)   # NCCL: one work for the whole batch
    group_peer = peers[0] if len(set(peers)) == 1 else comm.state.pp_ranks

    def entries(key, kind):
        if coalesced:
            return [(w, group_peer, kind) for w in works]
        return [(w, peer, kind) for w, peer, k in zip(works, peers, owner) if k == key]

    sends = None
    if sent:
        sends = Posted(comm, label, entries(None, "send"), None, None, None, sent, (s, b))
    received = {}
    for key, buf in buffers.items():
        act, side_buf = buf if key[0] == "act" else (None, None)
        grad = buf if key[0] == "grad" else None
        received[key] = Posted(comm, label, entries(key, key[0]), act, side_buf, grad, [],
                               (s, b))
    return sends, received
