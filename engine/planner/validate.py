"""The planner checked against layouts that really run (runners/validate_planner.py, the
multi-rank test): each layout trained on gloo, its measured peak memory and step time
beside the planner's predictions; how (one job, rounds, pooled calibrations) is in the
runner's docstring."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.planner import Layout, PlanRequest, predict_memory, predict_time
from model import GLMConfig
from model.masks import causal_example, collate

# name -> (tp, pp, dp, zero_stage, sequence_parallel, micro-batch size)
LAYOUTS = {
    "single": (1, 1, 1, 0, False, 2),
    "pp2": (1, 2, 1, 0, False, 1),
    "dp2-z0": (1, 1, 2, 0, False, 2),
    "dp2-z1": (1, 1, 2, 1, False, 2),
    "tp2": (2, 1, 1, 0, False, 2),
    "tp2-sp": (2, 1, 1, 0, True, 2),
    "pp2-dp2": (1, 2, 2, 0, False, 1),
}


def layout_of(name: str, global_batch: int) -> Layout:
    tp, pp, dp, zero, sp, mbs = LAYOUTS[name]
    if global_batch % (dp * mbs):
        raise ValueError(f"global batch {global_batch} is not divisible by dp * mbs = "
                         f"{dp * mbs} for layout {name}")
    return Layout(tp=tp, pp=pp, dp=dp, vpp=1, micro_batch_size=mbs,
                  num_microbatches=global_batch // (dp * mbs), recompute=False,
                  zero_stage=zero, sequence_parallel=sp)


def model_config(preset: str = "small", layers: int | None = 4) -> GLMConfig:
    extra = {"num_layers": layers} if layers else {}
    return GLMConfig.preset(preset, kernels="torch", **extra)


class SyntheticTokens:
    """Full-length causal-LM rows of random tokens; batch i is a pure function of i."""

    def __init__(self, seq_len: int, vocab: int):
        self.seq_len, self.vocab = seq_len, vocab

    def get_batch(self, index: int, batch_size: int) -> dict:
        g = torch.Generator().manual_seed(index)
        rows = torch.randint(0, self.vocab, (batch_size, self.seq_len + 1), generator=g)
        return collate([causal_example(r.tolist()) for r in rows], self.seq_len, pad_id=0)


def _group_of_first(n: int, world: int, rank: int, timeout):
    """A group of ranks 0 .. n-1 (the default group when n == world; None on the other
    ranks). Collective: every rank of the job calls it."""
    from engine.parallel.state import new_groups
    return None if n == world else new_groups([list(range(n))], rank, timeout)[0]


def _sub_state(dims, rank: int, timeout):
    """engine.parallel.state's ParallelState for a layout on ranks 0 .. dims.world_size - 1
    of a larger job (init_distributed wants the whole job), None on the other ranks; the
    single-process state for a layout of one rank. Collective: every rank creates every
    group, in the same order."""
    from engine.parallel.state import ParallelState, build_state
    if dims.world_size == 1:
        return ParallelState.single()
    return build_state(dims, rank, torch.device("cpu"), "gloo", timeout)


def _model_parallel_group(dims, rank: int, timeout):
    """engine.parallel.state.model_parallel_group for a layout on the first ranks
    (collective)."""
    from engine.parallel.state import model_parallel_ranks, new_groups
    if dims.tp * dims.pp == 1:
        return None
    return new_groups(model_parallel_ranks(dims), rank, timeout)[0]


def _run_config(model: dict, lay: Layout, seq_len: int):
    from engine.config import build_run_config
    return build_run_config({
        "model": {"preset": "tiny", **model},
        "parallel": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero_stage": lay.zero_stage,
                     "sequence_parallel": lay.sequence_parallel, "schedule": "1f1b"},
        "train": {"steps": 1, "micro_batch_size": lay.micro_batch_size,
                  "num_microbatches": lay.num_microbatches, "seq_len": seq_len,
                  "precision": "fp32", "eval_every": 0, "warmup_steps": 0,
                  "out_dir": os.path.join(tempfile.gettempdir(), "validate-planner")}})


def validate_worker(rank: int, world: int, model: dict, layouts: list, seq_len: int,
                    rounds: int, stat: str = "median") -> dict:
    """Every rank of one job as large as the largest layout. Each layout runs on the
    first ranks of the job while the others sleep in a barrier (gloo waits without
    spinning), so one job measures every layout:

      1. build each layout's Trainer, one metered step: this rank's memory
      2. rounds: in each, calibrate for every layout size n on ranks 0 .. n-1 (one
         rank's rates, how many of the n the host runs at that rate at once, the cost
         of a collective between computations and the straggler term, gloo bandwidth),
         then one timed step of every layout. The order rotates each round, so load
         drifting on a shared machine hits every layout and its calibration alike. A
         barrier before each step; times max-reduced over the job; round 0 warms up.
    Returns this rank's memory per layout, and on rank 0 the times [round][layout] and
    the profiles [round][size]."""
    from engine.parallel.state import ParallelDims
    from engine.planner import calibrate
    from engine.planner.measure import schedule_meter_peak, trainer_memory, trainer_step
    from engine.train.trainer import Trainer
    timeout = timedelta(seconds=300)
    sizes = sorted({lay.tp * lay.pp * lay.dp for _, lay in layouts})
    groups = {n: _group_of_first(n, world, rank, timeout) for n in sizes}
    steps, memory = {}, {}
    for name, lay in layouts:
        dims = ParallelDims(tp=lay.tp, pp=lay.pp, dp=lay.dp)
        state = _sub_state(dims, rank, timeout)
        mp_group = _model_parallel_group(dims, rank, timeout)
        dist.barrier()
        if rank < dims.world_size:
            cfg = _run_config(model, lay, seq_len)
            tr = Trainer.from_config(cfg,
                                     SyntheticTokens(seq_len, cfg.model.padded_vocab_size),
                                     state=state, log=lambda *a: None, mp_group=mp_group)
            memory[name] = {"stage": tr.stage, "tp_rank": tr.tp_rank,
                            **asdict(trainer_memory(tr)),
                            "schedule_meter": schedule_meter_peak(tr)}
            _, _, step, optimizer_step = trainer_step(tr)
            steps[name] = (step, optimizer_step)
        dist.barrier()
    times = torch.zeros(rounds + 1, len(layouts), dtype=torch.float64)
    profiles = [[None] * len(sizes) for _ in range(rounds + 1)]
    for r in range(rounds + 1):
        for k in range(len(sizes)):
            j = (k + r) % len(sizes)
            dist.barrier()
            if rank < sizes[j]:
                prof = calibrate(torch.device("cpu"), group=groups[sizes[j]], repeats=3,
                                 stat=stat)
                profiles[r][j] = prof
        for k in range(len(layouts)):
            i = (k + r) % len(layouts)
            name = layouts[i][0]
            dist.barrier()
            if name in steps:
                t0 = time.perf_counter()
                steps[name][0]()
                steps[name][1]()
                times[r, i] = time.perf_counter() - t0
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return {"rank": rank, "memory": memory, "times": times[1:].tolist(),
            "profiles": [dict(zip(sizes, p)) for p in profiles[1:]] if rank == 0 else None}


@dataclass(frozen=True)
class Row:
    name: str
    layout: Layout
    world: int
    pred_mem: float          # max over stages of states + saved activations, bytes
    meas_mem: float          # max over ranks
    pred_act: float          # activations of the predicted peak stage
    meas_act: float          # activations of the measured peak rank
    pred_time: float         # s per step, with the profile pooled over the rounds
    samples: tuple           # measured s per step, one per round
    rank_errors: tuple       # per rank: predicted / measured - 1 for that rank's stage
    flops: float             # calibrated matmul FLOP/s of one rank
    host_cores: float        # ranks the host ran at that rate at once (0: one per rank)
    meter_gaps: tuple        # per rank: schedule meter peak - saved-tensor meter peak
    latency: float = 0.0     # calibrated cost of a collective between computations, s
    straggler: float = 0.0   # calibrated straggler term

    @property
    def meas_time(self) -> float:
        return statistics.median(self.samples)

    @property
    def mem_error(self) -> float:
        return self.pred_mem / self.meas_mem - 1

    @property
    def act_error(self) -> float:
        return self.pred_act / self.meas_act - 1


def pool_profiles(profiles: list):
    """One profile from the rounds' calibrations of one size: each short calibration on
    a shared host is noisy, the rounds together span the whole measurement. Rates and
    bandwidths: medians; the collectives' latency and straggler term: means (a step
    pays the mean wait of its many synchronisations, and the waits are skewed)."""
    med = {f: statistics.median(getattr(p, f) for p in profiles)
           for f in ("flops", "mem_bw", "n_half", "op_overhead", "intra_bw", "inter_bw",
                     "host_cores")}
    p2p = [p.p2p_bw for p in profiles if p.p2p_bw]
    return replace(profiles[0], **med, p2p_bw=statistics.median(p2p) if p2p else None,
                   latency=statistics.fmean(p.latency for p in profiles),
                   straggler=statistics.fmean(p.straggler for p in profiles))


def validate(names, model: dict, seq_len: int, global_batch: int, rounds: int,
             spawn, stat: str = "median", log=print) -> list[Row]:
    """Measure the named layouts in one job of `spawn(fn, world, *args)` (per-rank results
    back, like tests/dist.py run_workers) and predict each with the profile calibrated
    in that job for its size."""
    cfg = GLMConfig.preset("tiny", **model)
    layouts = [(n, layout_of(n, global_batch)) for n in names]
    world = max(lay.tp * lay.pp * lay.dp for _, lay in layouts)
    ranks = spawn(validate_worker, world, model, layouts, seq_len, rounds, stat)
    profiles = ranks[0]["profiles"]          # [round][size]
    times = ranks[0]["times"]
    pooled = {n: pool_profiles([p[n] for p in profiles]) for n in profiles[0]}
    rows = []
    for i, (name, lay) in enumerate(layouts):
        n = lay.tp * lay.pp * lay.dp
        req = PlanRequest(cfg, n, 16, seq_len, global_batch, precision="fp32",
                          kernels="torch", sequence_parallel=lay.sequence_parallel)
        est = predict_memory(req, lay)
        errs, gaps, worst = [], [], None
        for r in ranks[:n]:
            got = r["memory"][name]
            meas = got["params"] + got["grads"] + got["optimizer"] + got["activations"]
            errs.append(est.stages[got["stage"]].states_and_activations / meas - 1)
            gaps.append(got["schedule_meter"] - got["activations"])
            if worst is None or meas > worst[0]:
                worst = (meas, got["activations"])
        peak = max(est.stages, key=lambda st: st.states_and_activations)
        prof = pooled[n]
        row = Row(name, lay, n, peak.states_and_activations, worst[0], peak.activations,
                  worst[1], predict_time(req, lay, prof).total, tuple(t[i] for t in times),
                  tuple(errs), prof.flops, prof.host_cores, tuple(gaps), prof.latency,
                  prof.straggler)
        rows.append(row)
        if log:
            log(format_row(row))
    return rows

HEADER = (f"{'layout':<9} {'ranks':>5} {'shape':<24} {'mem pred MB':>11} {'meas MB':>8} "
          f"{'err':>7} {'act pred':>8} {'act meas':>8} {'err':>7} {'step pred s':>11} "
          f"{'meas s':>7} {'GFLOP/s':>7} {'cores':>5} {'lat ms':>6} {'strag':>5}")


def format_row(r: Row) -> str:
    return (f"{r.name:<9} {r.world:>5} {r.layout.short():<24} {r.pred_mem / 1e6:>11.2f} "
            f"{r.meas_mem / 1e6:>8.2f} {r.mem_error:>+7.1%} {r.pred_act / 1e6:>8.2f} "
            f"{r.meas_act / 1e6:>8.2f} {r.act_error:>+7.1%} {r.pred_time:>11.3f} "
            f"{r.meas_time:>7.3f} {r.flops / 1e9:>7.1f} {r.host_cores:>5.1f} "
            f"{r.latency * 1e3:>6.2f} {r.straggler:>5.2f}")


def scatter(row: Row) -> float:
    """The measurement's own noise: median absolute deviation of the per-round times."""
    med = row.meas_time
    return statistics.median(abs(t - med) for t in row.samples)


def ranking_pairs(rows: list[Row], margin: float = 0.25) -> list[tuple[Row, Row, str]]:
    """Every pair the planner separates by at least `margin` (slower >= (1 + margin) x
    faster, predicted), as (predicted faster, predicted slower, verdict): "order" when the
    measured medians agree, "tie" when they are reversed by no more than the larger of
    the two layouts' scatter (within the measurement's noise), else "wrong". Closer pairs
    are not ranked: the model does not claim an order finer than its own error."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            lo, hi = sorted((a, b), key=lambda r: r.pred_time)
            if hi.pred_time < (1 + margin) * lo.pred_time:
                continue
            diff = hi.meas_time - lo.meas_time
            verdict = ("order" if diff > 0 else
                       "tie" if -diff <= max(scatter(lo), scatter(hi)) else "wrong")
            out.append((lo, hi, verdict))
    return out


def spearman(xs, ys) -> float:
    """Rank correlation (no ties expected in float timings)."""
    n = len(xs)
    rx = {k: r for r, k in enumerate(sorted(range(n), key=xs.__getitem__))}
    ry = {k: r for r, k in enumerate(sorted(range(n), key=ys.__getitem__))}
    d2 = sum((rx[k] - ry[k]) ** 2 for k in range(n))
    return 1 - 6 * d2 / (n * (n * n - 1))


def summary(rows: list[Row], margin: float = 0.25) -> str:
    pairs = ranking_pairs(rows, margin)
    count = {v: sum(1 for *_, x in pairs if x == v) for v in ("order", "tie", "wrong")}
    rho = spearman([r.pred_time for r in rows], [r.meas_time for r in rows])
    lines = [f"step-time ranking: {len(pairs)} pairs predicted >= {margin:.0%} apart: "
             f"{count['order']} in the measured order, {count['tie']} tied within noise, "
             f"{count['wrong']} reversed; Spearman rho over all layouts {rho:.2f}"]
    for lo, hi, verdict in pairs:
        if verdict != "order":
            lines.append(f"  {verdict}: {lo.name} ({lo.pred_time:.3f} pred / {lo.meas_time:.3f}"
                         f" +- {scatter(lo):.3f} meas) vs {hi.name} ({hi.pred_time:.3f} / "
                         f"{hi.meas_time:.3f} +- {scatter(hi):.3f})")
    return "\n".join(lines)
