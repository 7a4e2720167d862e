"""`--train.profile_steps A:B`: profile training steps A..B (1-based, inclusive).

Writes into <out_dir>/profile/:
  trace_rank<r>.json   torch.profiler trace of this rank (Chrome / Perfetto JSON). The
                       schedule names a range per op: "forward stage0 F3.0" (microbatch
                       3, chunk 0), "backward stage1 B3.0", "exchange stage0 X[...]".
  timeline.json        the pipeline timeline from the schedule's own device-time
                       measurements (engine.pipeline.stats.ScheduleStats.timeline): one row per
                       rank, compute vs wait, Chrome trace JSON; written by rank 0.
  timeline.png         the same as a picture, when matplotlib is installed.
Each rank's timeline starts at its own step start (ranks start a step together, after
the previous step's collectives, so rows line up to within that skew).
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist


def parse_steps(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise ValueError(f"train.profile_steps={text!r} must be A:B (1-based steps, "
                         "e.g. 3:4)") from None
    if not 1 <= a <= b:
        raise ValueError(f"train.profile_steps={text!r} needs 1 <= A <= B")
    return a, b


class StepProfiler:
    def __init__(self, first: int, last: int, out_dir: str, state, device=None,
                 log=print):
        self.first, self.last = first, last
        self.dir = os.path.join(out_dir, "profile")
        self.state, self.log = state, log
        self.device = torch.device(device or "cpu")
        self.rank = state.rank
        self.prof = None
        self.steps: list[tuple[int, list]] = []   # (step, ScheduleStats.timeline)
        self.done = False

    @classmethod
    def from_config(cls, spec: str, out_dir: str, state, device=None, log=print):
        if not spec:
            return _Inactive()
        return cls(*parse_steps(spec), out_dir, state, device, log)

    @contextlib.contextmanager
    def step(self, n: int):
        """Around training step n: yields a ScheduleStats to pass to the schedule while
        n is profiled, else None."""
        if self.done or not self.first <= n <= self.last:
            yield None
            return
        from engine.pipeline.stats import ScheduleStats
        if self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
        stats = ScheduleStats()
        with torch.profiler.record_function(f"train step {n}"):
            yield stats
        self.steps.append((n, stats.timeline))
        if n == self.last:
            self.close()

    def close(self):
        """Write everything profiled so far (also when training stops before step B)."""
        if self.done or self.prof is None:
            return
        self.done = True
        self.prof.__exit__(None, None, None)
        os.makedirs(self.dir, exist_ok=True)
        trace = os.path.join(self.dir, f"trace_rank{self.rank}.json")
        self.prof.export_chrome_trace(trace)
        rows = [(self.rank, self._stage(), self.steps)]
        if self.state.multi_rank:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows[0])
            rows = gathered
        if self.rank == 0:
            path = os.path.join(self.dir, "timeline.json")
            write_timeline(rows, path)
            png = write_timeline_png(rows, os.path.join(self.dir, "timeline.png"))
            self.log(f"profile: {trace} (per rank), {path}" + (f", {png}" if png else ""))

    def _stage(self) -> int:
        return self.state.coords.pp


class _Inactive:
    @contextlib.contextmanager
    def step(self, n: int):
        yield None

    def close(self):
        pass


def _layout(rows):
    """Step start offsets (s) shared by every rank: each profiled step after the longest
    rank's previous one, with a small gap."""
    steps = sorted({n for _, _, st in rows for n, _ in st})
    span = {n: max((end for _, _, st in rows for m, tl in st if m == n
                    for *_, end in tl), default=0.0) for n in steps}
    offsets, t = {}, 0.0
    for n in steps:
        offsets[n] = t
        t += span[n] * 1.05 + 1e-4
    return offsets


def write_timeline(rows, path: str):
    """rows: [(rank, stage, [(step, [(op, kind, start_s, end_s)])])] -> Chrome trace."""
    offsets = _layout(rows)
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "pipeline"}}]
    for rank, stage, steps in rows:
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank,
                       "args": {"name": f"rank {rank} (stage {stage})"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank,
                       "args": {"sort_index": rank}})
        for n, timeline in steps:
            for op, kind, start, end in timeline:
                events.append({"name": op, "cat": kind, "ph": "X", "pid": 0, "tid": rank,
                               "ts": (offsets[n] + start) * 1e6,
                               "dur": max(end - start, 0.0) * 1e6,
                               "cname": "good" if kind == "compute" else "terrible",
                               "args": {"step": n, "kind": kind}})
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)


def write_timeline_png(rows, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    offsets = _layout(rows)
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(rows) + 1.2))
    for rank, stage, steps in rows:
        for kind, color in (("compute", "tab:green"), ("wait", "tab:red")):
            bars = [((offsets[n] + a) * 1e3, (b - a) * 1e3) for n, tl in steps
                    for _, k, a, b in tl if k == kind]
            ax.broken_barh(bars, (rank - 0.4, 0.8), color=color,
                           label=kind if rank == rows[0][0] else None)
    ax.set_yticks([r for r, _, _ in rows])
    ax.set_yticklabels([f"rank {r} (stage {s})" for r, s, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
