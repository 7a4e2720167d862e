"""What one forward_backward call measured on this rank: op timings and activations in
flight (ScheduleStats), and the live bytes kept for backward (SavedActivationMeter)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch


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
        """Add the ops measured by an engine.timing.Clock as (op, is an exchange, start
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

    def op_seconds(self) -> dict[tuple[int, str], list[float]]:
        """The compute time of every F / B / W op of the step, per (chunk, kind): what
        engine.pipeline.sim.simulate takes as measured costs (waits left out)."""
        out: dict[tuple[int, str], list[float]] = {}
        for op, what, start, end in self.timeline:
            if what == "compute" and op[0] in "FBW":
                out.setdefault((int(op.rsplit(".", 1)[1]), op[0]), []).append(end - start)
        return out


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

    def hold(self, t):
        """Count t as held (once per storage) until the returned holder is dropped: for
        tensors kept alive outside autograd's saved tensors (split_backward's X)."""
        return self._pack(t)

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
