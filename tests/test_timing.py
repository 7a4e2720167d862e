"""engine.timing: host clock with a sync at the marks on CPU, CUDA events on CUDA (mocked
here: events are recorded at the marks and read, with one synchronize, only when the
interval is asked for), and the peaks MFU is measured against."""
import time
from unittest import mock

import pytest
import torch

from engine import timing
from engine.pipeline.stats import ScheduleStats


def test_cpu_clock_measures_wall_time():
    clock = timing.Clock("cpu")
    with clock.span() as s:
        time.sleep(0.02)
    assert 0.015 < s.seconds < 0.5
    a = clock.mark()
    b = clock.mark()
    assert 0 <= clock.seconds(a, b) < 0.01
    assert timing.time_fn(lambda: time.sleep(0.01), "cpu", warmup=0, reps=3) >= 0.009


class FakeEvent:
    made = []

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t, self.recorded, self.synced = None, False, False
        FakeEvent.made.append(self)

    def record(self):
        self.recorded = True
        self.t = len(FakeEvent.made) * 10.0      # ms: 10 ms between consecutive events

    def synchronize(self):
        self.synced = True

    def elapsed_time(self, end):
        assert end.synced, "read an event before synchronising it"
        return end.t - self.t


def test_cuda_clock_records_events_and_syncs_only_when_read():
    FakeEvent.made = []
    with mock.patch.object(torch.cuda, "Event", FakeEvent), \
            mock.patch.object(torch.cuda, "synchronize") as sync:
        clock = timing.Clock(torch.device("cuda", 0))
        a, b = clock.mark(), clock.mark()
        assert a.recorded and b.recorded and not b.synced
        sync.assert_not_called()                  # marks queue events, never block
        assert clock.seconds(a, b) == pytest.approx(0.010)
        assert b.synced
        timing.synchronize(torch.device("cuda", 0))
        sync.assert_called_once()


def test_schedule_stats_resolve_marks_into_compute_and_wait():
    FakeEvent.made = []
    with mock.patch.object(torch.cuda, "Event", FakeEvent):
        clock = timing.Clock("cuda")
        marks = []
        # F0.0 waits 10 ms for its received input, then computes 10 ms; the exchange
        # waits 10 ms; B0.0 computes 10 ms with nothing to wait for
        t0, w0, w1, t1 = (clock.mark() for _ in range(4))
        marks.append(("F0.0", False, t0, t1, (w0, w1)))
        marks.append(("X", True, clock.mark(), clock.mark(), None))
        marks.append(("B0.0", False, clock.mark(), clock.mark(), None))
        stats = ScheduleStats()
        stats.record(clock, marks)
    assert stats.compute_s == pytest.approx(0.020) and stats.comm_wait_s == pytest.approx(0.020)
    assert [(k, round(a, 3), round(b, 3)) for _, k, a, b in stats.timeline] == [
        ("wait", 0.01, 0.02), ("compute", 0.02, 0.03), ("wait", 0.04, 0.05),
        ("compute", 0.06, 0.07)]


def test_peak_from_device_profile_on_cuda_and_measured_once_on_cpu():
    with mock.patch.object(torch.cuda, "get_device_name", return_value="NVIDIA H200"):
        assert timing.peak_flops(torch.device("cuda", 0)) == (989e12, "h200 bf16 peak")
    with mock.patch.object(torch.cuda, "get_device_name", return_value="Some GPU"):
        assert timing.peak_flops("cuda")[0] is None
    timing.measured_matmul_flops.cache_clear()
    with mock.patch.object(timing, "time_fn", wraps=timing.time_fn) as timed:
        first = timing.peak_flops("cpu")[0]
        second = timing.peak_flops("cpu")[0]
    assert first == second and first > 1e8 and timed.call_count == 1
