"""Graceful stop: SIGTERM / SIGINT finish the current step, save, exit 0.

Schedulers and torchelastic send SIGTERM on preemption, and a terminal sends SIGINT on
Ctrl-C. Inside `GracefulStop()` the first such signal only sets a flag; the training loop
asks `agreed()` at every step boundary, which is one 1-element all-reduce (MAX) of the
flag over the whole job, so every rank stops after the same step even when only one of
them got the signal (or they got it in different steps). The run then saves its
checkpoint as at the end of training and says so in one line.

A second signal exits at once (exit code 128 + signal number, one line on stderr), for
an operator who does not want to wait. Repeats within REPEAT_WINDOW_S of the first count
as the same request: torchrun forwards the signal it gets to its workers, and a terminal's
Ctrl-C or a scheduler's `kill -TERM -<pgid>` reaches both torchrun and the workers, so a
worker may see one request twice within milliseconds.

Outside a `with GracefulStop():` block (tests, notebooks) nothing is installed and the
loop runs no extra collective.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

REPEAT_WINDOW_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_active: "GracefulStop | None" = None


def active() -> "GracefulStop | None":
    """The stop request handler in force in this process, if any."""
    return _active


class GracefulStop:
    def __init__(self, signals=SIGNALS):
        self.signals = signals
        self.signal_name: str | None = None   # the local request, if any
        self.requested_at: float | None = None
        self.stopped_by: str | None = None    # set once the job agreed to stop
        self._previous = {}

    # ---- installation -----------------------------------------------------------------
    def __enter__(self) -> "GracefulStop":
        global _active
        if threading.current_thread() is not threading.main_thread():
            return self   # signals are delivered to the main thread only
        # Python runs a handler in the main thread only between bytecodes, so not while
        # that thread is blocked in a collective: the C-level handler's wakeup byte is
        # read by a thread instead, which acts on each signal as it arrives
        self._rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        self._wfd = wfd
        self._old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, lambda signum, frame: None)
        threading.Thread(target=self._read_signals, name="graceful-stop",
                         daemon=True).start()
        _active = self
        return self

    def __exit__(self, *exc):
        global _active
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._wfd)   # ends the reader thread
        if _active is self:
            _active = None
        return False

    def _read_signals(self):
        while True:
            try:
                data = os.read(self._rfd, 64)
            except OSError:
                return
            if not data:
                os.close(self._rfd)
                return
            for signum in data:
                if signum in [int(s) for s in self.signals]:
                    self._handle(signum)

    def _handle(self, signum, frame=None):
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.requested_at is None:
            self.signal_name, self.requested_at = name, now
            return
        if now - self.requested_at < REPEAT_WINDOW_S:
            return   # the same request, forwarded (see the module docstring)
        rank = os.environ.get("RANK")
        who = f"rank {rank}: " if rank is not None and int(os.environ.get(
            "WORLD_SIZE", "1")) > 1 else ""
        os.write(sys.stderr.fileno(), f"error: {who}second {name}: exiting now, without "
                 "saving\n".encode())
        os._exit(128 + signum)

    # ---- the step boundary ------------------------------------------------------------
    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def agreed(self, state) -> bool:
        """Whether the job stops after this step: the local request (its signal number,
        0 if none) MAX-reduced over every rank (a collective: call it at the same point
        on every rank)."""
        signum = int(signal.Signals[self.signal_name]) if self.requested else 0
        if state.multi_rank:
            from engine.parallel.failures import FailureBoard, wait_all
            t = torch.tensor([signum], dtype=torch.int32, device=state.device)
            started = time.monotonic()
            work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)   # the flag is
            world = list(range(dist.get_world_size()))                       # the signal's
            wait_all([work], state, "the stop-request all-reduce", [world],  # number
                     FailureBoard(), started=started)
            signum = int(t.item())
        if signum:
            self.stopped_by = signal.Signals(signum).name + (
                "" if self.requested else " (sent to another rank)")
        return bool(signum)
