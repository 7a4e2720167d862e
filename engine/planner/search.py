"""Score every valid layout and pick the fastest that fits.

    cands = plan(PlanRequest("chatglm3-6b", 8, 80, 4096, 64), device_profile("h100"))
    print(format_table(cands, top=20))
    choose_layout("chatglm3-6b", 8, 80, 4096, 64, device="h100")   # -> dict for a runner
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from engine.planner.devices import DeviceProfile, device_profile
from engine.planner.layouts import Layout, PlanRequest, enumerate_layouts
from engine.planner.memory import MemoryEstimate, predict_memory
from engine.planner.timing import TimeEstimate, predict_time

GB = 1e9


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    time: TimeEstimate
    capacity: float          # bytes usable for the model: device memory - reserved

    @property
    def fits(self) -> bool:
        return self.memory.peak.total <= self.capacity

    def sort_key(self):
        # layouts that fit before those that do not (a faster one that cannot run is no
        # option); then fastest first; ties (ZeRO 2 often equals ZeRO 1 here) go to less
        # memory, then to the simpler layout
        lay = self.layout
        return (not self.fits, round(self.time.total, 9), round(self.memory.peak.total),
                lay.zero_stage, lay.tp * lay.pp, lay.vpp, lay.micro_batch_size)


def plan(req: PlanRequest, device: DeviceProfile) -> list[Candidate]:
    """Every valid layout with its predicted memory and time: those that fit first, each
    group fastest first (`best` picks the first that fits; a table shows what memory costs)."""
    capacity = req.device_memory_bytes - device.reserved_bytes
    cands = [Candidate(lay, predict_memory(req, lay), predict_time(req, lay, device), capacity)
             for lay in enumerate_layouts(req)]
    return sorted(cands, key=Candidate.sort_key)


def best(cands: list[Candidate]) -> Candidate:
    """The fastest fitting candidate, or a ValueError saying how far the closest is."""
    for c in cands:
        if c.fits:
            return c
    low = min(cands, key=lambda c: c.memory.peak.total)
    raise ValueError(f"no layout fits in {low.capacity / GB:.1f} GB per device (after "
                     f"reserved memory): the smallest, {low.layout.short()}, needs "
                     f"{low.memory.peak.total / GB:.1f} GB")


def choose_layout(config, world_size: int, device_memory_gb: float | None = None,
                  seq_len: int = 2048, global_batch: int = 64,
                  device: str | DeviceProfile = "cpu", **request) -> dict:
    """The best layout as a ParallelConfig / TrainConfig-ready dict: tp, pp, dp, vpp,
    micro_batch_size, num_microbatches, recompute, zero_stage (plus schedule and
    sequence_parallel). `runners/pretrain.py --parallel auto` calls this.

    config: GLMConfig or preset name; device: profile name, "cpu" (measured now) or a
    DeviceProfile; device_memory_gb defaults to the device's; **request: other
    PlanRequest fields (gpus_per_node, precision, kernels, ...)."""
    dev = device if isinstance(device, DeviceProfile) else device_profile(device)
    if device_memory_gb is None:
        device_memory_gb = dev.memory_bytes / GB
    request.setdefault("precision", dev.precision)
    request.setdefault("kernels", dev.kernels)
    req = PlanRequest(config, world_size, device_memory_gb, seq_len, global_batch, **request)
    return best(plan(req, dev)).layout.as_dict()


def format_table(cands: list[Candidate], top: int | None = 20) -> str:
    """One line per candidate in plan()'s order (fitting rows first, each group fastest
    first): layout, predicted peak memory per device with its breakdown (params / grads /
    optimizer / activations / workspace, GB), step time with compute and exposed
    communication, bubble, tokens/s. Rows that do not fit say NO; the chosen layout is the
    first row that fits (marked *; in a list not ordered by plan(), it is listed after the
    top rows when it is not among them)."""
    head = (f"{'#':>3} {'layout':<34} {'fits':<4} {'mem GB':>7}  "
            f"{'param/grad/optim/act/work':<27} {'step s':>7} {'comp':>6} {'comm':>6} "
            f"{'bubble':>6} {'tok/s':>9}")
    lines = [head, "-" * len(head)]
    # ZeRO 2 often predicts exactly what ZeRO 1 does (see memory.py): show one of the two
    shown, seen, hidden = [], set(), 0
    for c in cands:
        key = (replace(c.layout, zero_stage=0), round(c.time.total, 6),
               round(c.memory.peak.total / 1e6))
        if key in seen:
            hidden += 1
            continue
        seen.add(key)
        shown.append(c)
    chosen = next((c for c in cands if c.fits), None)
    rows = list(enumerate(shown, 1))
    if top is not None and len(rows) > top:
        rank = next((i for i, c in rows if c is chosen), None)
        rows = rows[:top] + ([(None, None), (rank, chosen)] if rank and rank > top else [])
    for i, c in rows:
        if c is None:
            lines.append("  ...")
            continue
        m, t = c.memory.peak, c.time
        parts = "/".join(f"{x / GB:.1f}" for x in
                         (m.params, m.grads, m.optimizer, m.activations, m.workspace))
        mark = "*" if c is chosen else " "
        lines.append(f"{i:>3}{mark}{c.layout.short():<34} {'yes' if c.fits else 'NO':<4} "
                     f"{m.total / GB:>7.1f}  {parts:<27} {t.total:>7.3f} "
                     f"{t.compute:>6.2f} {t.comm:>6.3f} {t.bubble_fraction:>6.1%} "
                     f"{t.tokens_per_s:>9,.0f}")
    if hidden:
        lines.append(f"({hidden} candidates identical to one above but for a higher ZeRO "
                     "stage are not shown)")
    return "\n".join(lines)
