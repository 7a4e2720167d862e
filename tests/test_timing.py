"""engine.timing: host clock with a sync at the marks on CPU, CUDA events on CUDA (mocked
here: events are recorded at the marks and read, with one synchronize, only when the
interval is asked for), and the peaks MFU is measured against."""
import time
from unittest import mock

import pytest
import torch

from engine import timing
from engine.schedules import Op, ScheduleStats


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
        ops = [Op("F", 0), Op("X"), Op("B", 0)]
        marks = [(op, clock.mark(), clock.mark()) for op in ops]
        stats = ScheduleStats()
        stats.record(clock, marks)
    assert stats.compute_s == pytest.approx(0.020) and stats.comm_wait_s == pytest.approx(0.010)
    assert [(k, round(a, 3), round(b, 3)) for _, k, a, b in stats.timeline] == [
        ("compute", 0.0, 0.01), ("wait", 0.02, 0.03), ("compute", 0.04, 0.05)]


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
