"""Device-true time, in one place: every step time, schedule split and benchmark reads
its clock from here.

On CUDA the host runs ahead of the GPU, so a host timer measures launch time. A `Clock`
on CUDA records events on the current stream and reads them only when asked (one
synchronisation per measurement, not per mark); elsewhere it reads time.perf_counter
after synchronising the device at the mark (a no-op on CPU, whose ops finish before
they return).

    clock = Clock(device)
    a = clock.mark(); work(); b = clock.mark()
    seconds = clock.seconds(a, b)        # waits for b on CUDA

    with clock.span() as s: work()
    s.seconds

MFU needs the device's dense matmul peak: `peak_flops(device)` takes it from the
planner's device profiles for known GPUs and measures it once (cached) on CPU.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch


def as_device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def synchronize(device) -> None:
    """Wait until the device has finished the work queued so far."""
    device = as_device(device)
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    sync = getattr(backend, "synchronize", None)
    if sync is not None:
        sync(device) if device.type == "cuda" else sync()


class Span:
    """An interval measured by a Clock; `seconds` resolves it (syncs on CUDA)."""

    def __init__(self, clock: "Clock"):
        self.clock, self.start, self.end = clock, None, None

    @property
    def seconds(self) -> float:
        return self.clock.seconds(self.start, self.end)


class Clock:
    def __init__(self, device):
        self.device = as_device(device)
        self.events = self.device.type == "cuda"

    def mark(self):
        """A point in device time: a recorded CUDA event, or perf_counter seconds."""
        if self.events:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        synchronize(self.device)
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        """Device seconds from mark `start` to mark `end` (waits for `end` on CUDA)."""
        if self.events:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start

    @contextlib.contextmanager
    def span(self):
        s = Span(self)
        s.start = self.mark()
        try:
            yield s
        finally:
            s.end = self.mark()


def time_fn(fn, device, warmup: int = 1, reps: int = 5, stat: str = "median") -> float:
    """Seconds per call of fn() on `device` (median or best of reps, after warmup)."""
    clock = Clock(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        with clock.span() as s:
            fn()
        times.append(s.seconds)
    times.sort()
    return times[0] if stat == "best" else times[len(times) // 2]


# ---- peaks for MFU ----------------------------------------------------------------------

# substrings of torch.cuda.get_device_name() -> planner profile
_GPU_NAMES = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"))


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device_type: str = "cpu", n: int = 1024,
                          threads: int | None = None) -> float:
    """This process's best fp32 n^3 matmul FLOP/s, measured once per (device, n, threads)."""
    device = torch.device(device_type)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return 2 * n ** 3 / time_fn(lambda: a @ b, device, warmup=2, reps=7, stat="best")


def peak_flops(device) -> tuple[float | None, str]:
    """(dense matmul FLOP/s to measure MFU against, where the figure comes from). CUDA:
    the planner's profile for the device's name (bf16 dense peak), None when unknown;
    CPU: the measured fp32 matmul rate with this process's thread count."""
    device = as_device(device)
    if device.type == "cuda":
        from engine.planner.devices import PROFILES
        name = torch.cuda.get_device_name(device)
        for key, profile in _GPU_NAMES:
            if key in name:
                return PROFILES[profile].flops, f"{profile} bf16 peak"
        return None, f"no profile for {name}"
    if device.type == "cpu":
        return (measured_matmul_flops("cpu", threads=torch.get_num_threads()),
                "measured fp32 matmul")
    return None, f"no peak known for {device.type}"
