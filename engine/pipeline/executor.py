"""The executor: runs one stage's program (engine/pipeline/program.py) for one step over
point-to-point transfers (engine/pipeline/p2p.py), with the forwards and backwards of its
model chunks in between.

Activation deallocation: once a stage output has been sent downstream only its autograd
graph is needed, so its .data is swapped for a 1-element tensor; its backward restores
the shape by aliasing the incoming gradient and runs `torch.autograd.backward(output,
grad)`. Stage s of 1F1B therefore holds at most min(p - s, m) microbatches of
activations, and no dead copies of its outputs.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from engine.pipeline.names import SPLIT_BACKWARD
from engine.pipeline.p2p import Side
from engine.timing import Clock

if TYPE_CHECKING:
    from engine.pipeline.schedules import StepContext

_KIND_NAMES = {"F": "forward", "B": "backward", "W": "weight-grad", "X": "exchange"}


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


class StageRun:
    """Runs one stage's program for one step. Tensors are keyed by (microbatch, chunk)
    and dropped as soon as the program is past their last use. Transfers are posted
    without waiting (`P2P.post`): a receive is waited on by the op that reads it, sends
    at the end of the step (their buffers are never reused within it)."""

    def __init__(self, step: StepContext, p: int, s: int, device):
        self.chunks, self.microbatches = step.chunks, step.microbatches
        # forward-only callers without labels may pass num_tokens=0: nothing divides by it
        self.num_tokens = max(step.num_tokens, 1)
        self.comm, self.p, self.s, self.v = step.comm, p, s, len(step.chunks)
        self.forward_only, self.no_sync = step.forward_only, step.no_sync
        self.scale_loss = step.scale_loss   # fp16 dynamic loss scaling
        self.forward_step = step.forward_step
        self.autocast = step.autocast or contextlib.nullcontext
        self.stats, self.meter, self.collect = step.stats, step.meter, step.outputs
        self.device = device
        self.inputs: dict = {}      # received hidden states [s, b, h], leaves
        self.outputs: dict = {}     # stage output (graph only, once sent) or the loss
        self.out_sides: dict = {}   # Side to send along with an output
        self.in_grads: dict = {}    # gradient of an input, to send upstream
        self.recvs: dict = {}       # ("act" | "grad", mb, chunk) -> the Posted batch
        self.sends: list = []       # Posted batches whose sends are not known complete
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.clock = None           # a Clock while a measured step runs
        self.stores = None
        if step.schedule in SPLIT_BACKWARD and not step.forward_only:
            from engine.pipeline.split_backward import store_for
            self.stores = [store_for(c) for c in step.chunks]
            for st in self.stores:
                st.meter = step.meter

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
        # split schedules: the chunk's linear layers leave their weight gradients to W
        record = self.stores[c].deferring() if self.stores is not None else \
            contextlib.nullcontext()
        with grad_mode, self.autocast(), record:
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

