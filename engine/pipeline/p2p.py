"""Stage-to-stage traffic: hidden states [s, b, h] (+ their side tensors) forward,
gradients backward, always as one `dist.batch_isend_irecv` batch per exchange.

Why batches: in the 1F1B steady state stage s sends an activation to s + 1 and waits for
a gradient from s + 1, while s + 1 sends that gradient and waits for the next activation.
If either side posted a blocking send before its receive they would wait on each other;
posting both halves as one batch and only then waiting (send_forward_recv_backward on s,
send_backward_recv_forward on s + 1) lets both complete. gloo matches sends to receives
per (pair, tag) and NCCL per pair in posting order, so every batch posts in one canonical
order (activation traffic, then gradient traffic; sends before receives) and uses one tag
per kind; with pp == 2 and interleaving, both directions run between the same two ranks.

Shapes are fixed per step and agreed once (`begin_step`): one small all-reduce over the
pipeline group carries stage 0's [s, b] and every stage's microbatch count, so a
mismatch is an error on every rank at the same point instead of a hang.

Failures: every wait has a deadline (the layout's timeout) and a failed one raises
PeerError naming the peer's rank and stage (engine/parallel/failures.py). On NCCL the
process group's watchdog enforces the same timeout on the device side.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.parallel.failures import (FailureBoard, PeerError, _first_line, _where, peer_error,
                                      wait_all)

TAG_ACT, TAG_SIDE, TAG_GRAD = 1, 2, 3


# ---- what travels with the hidden states ----------------------------------------------

@dataclass
class Side:
    """Per-microbatch integer tensors every stage needs to rebuild rotary angles and the
    attention mask (no dense masks cross stages), all [b, s]: position_ids and
    block_position_ids (GLM 2D positions), prefix_lens per token (the absolute end of the
    token's bidirectional prefix: prefix-LM / blank-infilling Part A) and doc_starts (the
    absolute start of the token's document: packed rows, model/masks.py `pack`; all 0
    for one example per row). Per token always, so the message size is fixed per shape."""
    position_ids: torch.Tensor
    block_position_ids: torch.Tensor
    prefix_lens: torch.Tensor
    doc_starts: torch.Tensor

    @classmethod
    def from_batch(cls, batch: dict, device) -> "Side":
        b, s = batch["input_ids"].shape
        pos = batch.get("position_ids")
        blk = batch.get("block_position_ids")
        pre = batch.get("prefix_lens")
        doc = batch.get("doc_starts")
        pos = torch.arange(s).expand(b, s) if pos is None else pos
        blk = torch.zeros(b, s, dtype=torch.long) if blk is None else blk
        pre = torch.zeros(b, dtype=torch.long) if pre is None else pre
        pre = pre.view(b, 1).expand(b, s) if pre.dim() == 1 else pre
        doc = torch.zeros(b, s, dtype=torch.long) if doc is None else doc
        return cls(*(t.to(device, torch.long) for t in (pos, blk, pre, doc)))

    def pack(self) -> torch.Tensor:
        # one int64 message [4 * b * s] instead of four
        return torch.cat([self.position_ids.reshape(-1), self.block_position_ids.reshape(-1),
                          self.prefix_lens.reshape(-1), self.doc_starts.reshape(-1)])

    @classmethod
    def unpack(cls, flat: torch.Tensor, s: int, b: int) -> "Side":
        return cls(*flat.view(4, b, s).unbind(0))

    @staticmethod
    def numel(s: int, b: int) -> int:
        return 4 * b * s


# ---- the point-to-point object --------------------------------------------------------

class P2P:
    """Activations to the next stage, gradients to the previous one, for one pipeline.

    hidden_size / dtype describe the hidden states [s, b, h] that cross stage boundaries;
    s and b are agreed per step by `begin_step`. wire_dtype (default: dtype) is what they
    travel in: under autocast the compute dtype, half the bytes of fp32; sends are cast
    to it and what arrives is cast back to dtype, so stages compute as without it. With
    sequence parallelism each tensor-parallel rank holds [s / tp, b, h] of the residual
    stream: pass seq_shards=tp (the side tensors still cover the whole sequence)."""

    def __init__(self, state, hidden_size: int, dtype: torch.dtype = torch.float32,
                 timeout: timedelta | float | None = None, board: FailureBoard | None = None,
                 seq_shards: int = 1, wire_dtype: torch.dtype | None = None):
        self.state = state
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.wire_dtype = wire_dtype or dtype
        self.seq_shards = seq_shards
        if timeout is not None and not isinstance(timeout, timedelta):
            timeout = timedelta(seconds=float(timeout))
        self.timeout = timeout or state.timeout
        self.board = board if board is not None else FailureBoard()
        self.group = state.pp_group
        self.prev, self.next = state.prev_rank, state.next_rank
        self.device = state.device
        self.shape: tuple[int, int] | None = None   # (s, b) agreed by begin_step
        self._key = None            # this stage's (m, [b, s]) when they were agreed
        self._on_change = False     # every stage sees its shapes: re-agree on change only
        self.handshakes = 0         # how many times the shapes were agreed

    # -- the shape handshake ------------------------------------------------------------
    def begin_step(self, microbatches: list[dict] | None, m: int):
        """Agree on [s, b] (from stage 0, the only stage that must read input_ids) and
        check every stage runs the same number of microbatches. One all-reduce (MAX) of
        [m, -m, s, -s, b, -b, bad, -sees] over the pipeline group: a collective every
        stage calls at the same point, so it cannot deadlock, and every stage sees the
        same verdict.

        It runs on the first step and then only when this stage's (m, [b, s]) changes:
        every stage must then be able to see the shapes (its microbatches carry
        input_ids), which the first handshake checks (`sees`); if one cannot, every
        stage keeps the per-step handshake, so they always call it together."""
        key = self._local_key(microbatches, m)
        if self.shape is not None and self._on_change and key == self._key:
            return self.shape
        s = b = bad = 0
        sees = int(key[1] is not None)
        if key[1] is not None:
            if key[1] == "mixed":
                bad = 1
            else:
                b, s = key[1]
        t = torch.tensor([m, -m, s, -s if sees else -(2 ** 62), b, -b if sees else -(2 ** 62),
                          bad, -sees], dtype=torch.long, device=self.device)
        self.handshakes += 1
        started = time.monotonic()
        try:
            work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        except Exception as err:  # noqa: BLE001
            raise peer_error(self.state, "the step handshake", self.state.pp_ranks, err,
                             self.board, 0.0, self.timeout) from err
        wait_all([work], self.state, "the step handshake", [self.state.pp_ranks], self.board,
                 self.timeout, started)
        m_max, m_min, s, s_min, b, b_min, bad, all_see = (int(x) for x in t.tolist())
        m_min, s_min, b_min, all_see = -m_min, -s_min, -b_min, -all_see == 1
        self.shape, self._key = None, None
        if bad:
            raise ValueError(f"stage 0 (rank {self.state.pp_ranks[0]}): microbatches of one "
                             "step must share one [b, s] shape")
        if m_max != m_min:
            raise ValueError(f"microbatch count differs across pipeline stages: between "
                             f"{m_min} and {m_max}")
        if all_see and (s, b) != (s_min, b_min):
            raise ValueError(f"microbatch shapes differ across pipeline stages: [b, s] from "
                             f"[{b_min}, {s_min}] to [{b}, {s}]")
        if s % self.seq_shards:
            raise ValueError(f"sequence length {s} is not divisible by seq_shards="
                             f"{self.seq_shards} (sequence parallelism)")
        self.shape, self._key, self._on_change = (s, b), key, all_see
        return self.shape

    @staticmethod
    def _local_key(microbatches, m: int):
        """(m, (b, s) | "mixed" | None): what this stage can see of the step's shapes."""
        if not microbatches or any(mb.get("input_ids") is None for mb in microbatches):
            return (m, None)
        shapes = {tuple(mb["input_ids"].shape) for mb in microbatches}
        return (m, shapes.pop() if len(shapes) == 1 else "mixed")

    # -- the one primitive ---------------------------------------------------------------
    def post(self, send_next=None, send_prev=None, recv_prev: bool = False,
             recv_next: bool = False) -> "Posted":
        """Post every requested transfer as one batch and return at once (Posted); the
        caller waits on a receive just before it reads it and on the sends before their
        buffers are reused (here: at the end of the step, `Posted.wait_sends`).

        send_next  (hidden [s, b, h], Side) to the next stage
        send_prev  gradient [s, b, h] to the previous stage
        recv_prev  receive (hidden, Side) from the previous stage
        recv_next  receive a gradient from the next stage"""
        if self.shape is None:
            raise RuntimeError("P2P.post before begin_step: shapes are not agreed yet")
        s, b = self.shape
        full = (s // self.seq_shards, b, self.hidden_size)   # this rank's [s, b, h]
        ops, peers, what, kinds = [], [], [], []

        def add(fn, tensor, peer, tag, kind, label=None):
            ops.append(dist.P2POp(fn, tensor, peer, self.group, tag))
            peers.append(peer)
            kinds.append(kind)
            if label:
                what.append(label)

        # canonical order: activation traffic, then gradient traffic; sends first
        sent = []
        if send_next is not None:
            hidden, side = send_next
            self._check(hidden, full, "activation to send")
            # sent in the wire dtype (autocast's under autocast), kept until the send is done
            sent += [hidden.to(self.wire_dtype).contiguous(), side.pack()]
            add(dist.isend, sent[-2], self.next, TAG_ACT, "send", "send activations")
            add(dist.isend, sent[-1], self.next, TAG_SIDE, "send")
        act = side_buf = grad = None
        if recv_prev:
            act = torch.empty(full, dtype=self.wire_dtype, device=self.device)
            side_buf = torch.empty(Side.numel(s, b), dtype=torch.long, device=self.device)
            add(dist.irecv, act, self.prev, TAG_ACT, "act", "receive activations")
            add(dist.irecv, side_buf, self.prev, TAG_SIDE, "act")
        if send_prev is not None:
            self._check(send_prev, full, "gradient to send")
            sent.append(send_prev.to(self.wire_dtype).contiguous())
            add(dist.isend, sent[-1], self.prev, TAG_GRAD, "send", "send gradients")
        if recv_next:
            grad = torch.empty(full, dtype=self.wire_dtype, device=self.device)
            add(dist.irecv, grad, self.next, TAG_GRAD, "grad", "receive gradients")
        label = " + ".join(what)   # e.g. "send activations + receive gradients"
        works = []
        if ops:
            try:
                works = dist.batch_isend_irecv(ops)
            except Exception as err:  # noqa: BLE001 - a peer already gone fails at post time
                raise peer_error(self.state, label,
                                 peers[0] if len(set(peers)) == 1 else peers, err, self.board,
                                 0.0, self.timeout) from err
        if len(works) == len(ops):
            entries = list(zip(works, peers, kinds))
        else:
            # NCCL coalesces a batch into one work: every part of it waits on all of them
            group_peer = peers[0] if len(set(peers)) == 1 else self.state.pp_ranks
            entries = [(w, group_peer, kind) for kind in dict.fromkeys(kinds) for w in works]
        return Posted(self, label, entries, act, side_buf, grad, sent, (s, b))

    def _check(self, t: torch.Tensor, full, name: str):
        if tuple(t.shape) != full or t.dtype != self.dtype:
            raise ValueError(f"{name} has shape {tuple(t.shape)} {t.dtype}; this step agreed "
                             f"on {full} {self.dtype}")

    # -- failures --------------------------------------------------------------------------
    def report_failure(self, err: BaseException):
        """Called when this rank's step fails: record it as the job's first failure unless
        it is only the echo of another rank's (a PeerError already reported that)."""
        if isinstance(err, PeerError):
            return
        me = _where(self.state, self.state.rank)
        self.board.report(f"{me} raised {type(err).__name__}: {_first_line(err)}")


class Posted:
    """One posted batch. Each receive is waited on separately (gloo completes works one
    by one; on NCCL a wait orders the stream after the batch), with the layout's timeout
    counted from the wait, so a receive posted early is not charged for the compute in
    between."""

    def __init__(self, comm: P2P, label: str, works, act, side_buf, grad, sent, shape):
        self.comm, self.label, self.works = comm, label, works
        self._act, self._side, self._grad, self._sent, self._shape = act, side_buf, grad, \
            sent, shape

    def _wait(self, kinds):
        picked = [(w, peer) for w, peer, kind in self.works if kind in kinds]
        if picked:
            wait_all([w for w, _ in picked], self.comm.state, self.label,
                     [peer for _, peer in picked], self.comm.board, self.comm.timeout)
        self.works = [x for x in self.works if x[2] not in kinds]

    def activation(self):
        """(hidden, Side) from the previous stage, once it has arrived."""
        self._wait(("act",))
        s, b = self._shape
        # back from the wire dtype: stages compute in the parameters' dtype
        return self._act.to(self.comm.dtype), Side.unpack(self._side, s, b)

    def gradient(self):
        self._wait(("grad",))
        return self._grad.to(self.comm.dtype)

    def sends_done(self) -> bool:
        return all(w.is_completed() for w, _, kind in self.works if kind == "send")

    def wait_sends(self):
        self._wait(("send",))
        self._sent = []
