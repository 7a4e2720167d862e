"""Benchmark the pipeline schedules on gloo/CPU against a single process and against
PyTorch's own torch.distributed.pipelining counterparts, on the same model, data, stage
split and microbatches:

    ours 1f1b         torch Schedule1F1B
    ours gpipe        torch ScheduleGPipe
    ours interleaved  torch ScheduleInterleaved1F1B       (vpp chunks per rank, bench.vpp)
    ours zb-h1        torch ScheduleInterleavedZeroBubble (one stage per rank: torch's
                      zero-bubble schedule closest to ZB-H1; ScheduleZBVZeroBubble needs
                      the V placement of two chunks per rank)
    ours zb-v         torch ScheduleZBVZeroBubble         (two chunks per rank in the V;
                      the even split needs layers % 2pp == 0, e.g. --model.num_layers 8 at
                      pp=2: not in the default bench.schedules; the small preset's 6 layers
                      do not split evenly in 4)

Every row, ours and torch's, builds the same stages: bench.layer_split (--layer-split)
is parallel.layer_split's even | balanced | explicit counts per virtual stage ("5,3").

    python runners/bench_pipeline.py                       # spawns bench.pp processes itself
    torchrun --nproc_per_node 2 runners/bench_pipeline.py  # or under torchrun

Prints, from rank 0:
  * step time (median over bench.reps, max over ranks) and tokens/s of every variant;
    the single-process baseline (whole model, gradient accumulation over the same
    microbatches) runs on rank 0 alone while the other ranks wait;
  * ours / PyTorch time ratios (target: our 1F1B at least 0.95x PyTorch's throughput);
  * the measured bubble: per rank, time blocked in exchanges / step time, against the
    textbook (p-1)/(m+p-1);
  * the ideal step of each schedule: engine.pipeline.sim plays its programs with the op
    times our ranks measured in it (per rep, the mean F / B / W per rank and chunk)
    and free transfers, so measured / ideal (rep by rep, median) is the executor's and
    the network's overhead, and single / ideal 1F1B the most any 1F1B over this split
    can reach with these ops;
  * stage 0's peak activation memory, 1F1B against GPipe: live bytes of tensors saved
    for backward (distinct storages, parameters excluded; saved-tensor hooks, see
    engine.pipeline.stats.SavedActivationMeter) plus the stage outputs the schedule holds.
    Target: 1F1B <= (p/m) * GPipe + 10%.
Variants run interleaved (A B C D, A B C D, ...) after one untimed warmup round, so
drift on a shared machine hits them alike.
"""
from __future__ import annotations

import contextlib
import os
import statistics
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.parallel.spawn import run_workers
from engine.pipeline.p2p import P2P
from engine.parallel.split import format_split, parse_layer_split
from engine.parallel.state import ParallelDims, init_distributed
from engine.pipeline.schedules import StepContext, forward_backward
from engine.pipeline.sim import simulate_measured
from engine.pipeline.stage import build_stage
from engine.pipeline.stats import SavedActivationMeter, ScheduleStats
from engine.timing import Clock
from engine.train.layer_split import resolve_layer_split
from model import GLM, GLMConfig
from engine.config_cli import Alias, command
from engine.errors import run_main


@dataclass
class BenchModel:
    preset: str = "small"          # GLMConfig preset
    num_layers: int = 0            # override num_layers (0: the preset's)
    # override padded_vocab_size (0: the preset's); 2048 keeps the output head from
    # doubling the last stage's work on the small preset
    padded_vocab_size: int = 2048


@dataclass
class BenchPipeline:
    pp: int = 2                    # pipeline stages (spawned processes)
    num_microbatches: int = 8      # m, per step
    micro_batch_size: int = 2      # sequences per microbatch
    seq_len: int = 128             # tokens per sequence
    # chunks per rank for the interleaved rows (0: the smallest >= 2 that divides the
    # layers per stage; none: no interleaved rows)
    vpp: int = 0
    # schedules to run (each ours and torch's)
    schedules: list[str] = field(default_factory=lambda: ["1f1b", "gpipe", "zb-h1",
                                                          "interleaved"])
    # layers per virtual stage of every row, ours and torch's alike (parallel.layer_split):
    # even | balanced | explicit counts such as "5,3" (rows with another number of
    # virtual stages are skipped)
    layer_split: str = "even"
    reps: int = 5                  # timed rounds (median reported)
    threads: int = 1               # intra-op threads per rank
    timeout_s: float = 300.0       # collectives / p2p timeout, s

    def __post_init__(self):
        bad = [x for x in self.schedules if x not in TORCH_COUNTERPART]
        if bad:
            raise ValueError(f"bench.schedules: unknown {bad[0]!r}; known: "
                             f"{', '.join(TORCH_COUNTERPART)}")
        for name in ("pp", "num_microbatches", "micro_batch_size", "seq_len", "reps",
                     "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"bench.{name}={getattr(self, name)} must be positive")
        try:
            parse_layer_split(self.layer_split)
        except ValueError as err:
            raise ValueError(str(err).replace("parallel.", "bench.", 1)) from None


COMMAND = command(__doc__, {"model": BenchModel, "bench": BenchPipeline}, aliases={
    "--preset": Alias("model.preset"), "--layers": Alias("model.num_layers"),
    "--vocab": Alias("model.padded_vocab_size"), "--pp": Alias("bench.pp"),
    "--microbatches": Alias("bench.num_microbatches"),
    "--micro-batch-size": Alias("bench.micro_batch_size"), "--seq-len": Alias("bench.seq_len"),
    "--vpp": Alias("bench.vpp"), "--schedules": Alias("bench.schedules"),
    "--layer-split": Alias("bench.layer_split"), "--reps": Alias("bench.reps"),
    "--threads": Alias("bench.threads"),
    "--timeout": Alias("bench.timeout_s")})


def model_config(args) -> GLMConfig:
    over = {}
    if args.model.num_layers:
        over["num_layers"] = args.model.num_layers
    if args.model.padded_vocab_size:
        over["padded_vocab_size"] = args.model.padded_vocab_size
    return GLMConfig.preset(args.model.preset, **over)


def make_microbatches(cfg: GLMConfig, args) -> list[dict]:
    """Causal LM microbatches (positions 0..s-1, no prefix), the same on every rank."""
    g = torch.Generator().manual_seed(0)
    b, s = args.bench.micro_batch_size, args.bench.seq_len
    out = []
    for _ in range(args.bench.num_microbatches):
        tokens = torch.randint(0, cfg.padded_vocab_size, (b, s + 1), generator=g)
        out.append(dict(input_ids=tokens[:, :-1], labels=tokens[:, 1:],
                        position_ids=torch.arange(s).expand(b, s).clone(),
                        block_position_ids=torch.zeros(b, s, dtype=torch.long),
                        prefix_lens=torch.zeros(b, dtype=torch.long)))
    return out


class TorchStage(nn.Module):
    """A GLM stage behind PyTorch pipelining's one-tensor interface: input_ids on the
    first stage, hidden states [s, b, h] after it, logits [b, s, V] from the last."""

    def __init__(self, glm: GLM):
        super().__init__()
        self.glm = glm

    def forward(self, x):
        if self.glm.pre_process:
            return self.glm(x)
        return self.glm(hidden_states=x)


# ---- the variants ---------------------------------------------------------------------

TORCH_COUNTERPART = {"1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe",
                     "interleaved": "ScheduleInterleaved1F1B",
                     "zb-h1": "ScheduleInterleavedZeroBubble",
                     "zb-v": "ScheduleZBVZeroBubble"}


class Ours:
    def __init__(self, schedule, cfg, state, mbs, num_tokens, vpp=1, layer_split="even"):
        self.name = f"ours {schedule}"
        self.schedule, self.state, self.mbs, self.num_tokens = schedule, state, mbs, num_tokens
        self.chunks = build_stage(cfg, state.dims.pp, vpp, state.stage, seed=0,
                                  schedule=schedule, layer_split=layer_split)
        self.comm = P2P(state, cfg.hidden_size)
        self.stats = ScheduleStats()

    def step(self, meter=None) -> float:
        self.stats = ScheduleStats()
        loss = forward_backward(StepContext(self.schedule, self.chunks, self.mbs,
                                            self.num_tokens, self.comm, self.state,
                                            stats=self.stats, meter=meter))
        for c in self.chunks:
            c.zero_grad(set_to_none=True)
        return loss

    def params(self):
        return [p for c in self.chunks for p in c.parameters()]


class Theirs:
    def __init__(self, schedule, cfg, state, mbs, num_tokens, vpp=1, layer_split="even"):
        import torch.distributed.pipelining as pipelining
        from torch.distributed.pipelining import PipelineStage
        self.name = f"torch {schedule}"
        self.state = state
        p = state.dims.pp
        from engine.pipeline.placement import placement_for
        place = placement_for(schedule, p, vpp)   # zb-v: the same V as ours
        chunks = build_stage(cfg, p, vpp, state.stage, seed=0, schedule=schedule,
                             layer_split=layer_split)
        self.modules = nn.ModuleList(TorchStage(c) for c in chunks)
        stages = [PipelineStage(mod, place.virtual(state.stage, c), p * vpp, state.device,
                                group=state.pp_group) for c, mod in enumerate(self.modules)]
        self.first = place.first(state.stage, 0)
        self.last = place.last(state.stage, vpp - 1)

        def loss_fn(logits, target):  # same convention as ours: token sum / global count
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   ignore_index=-100, reduction="sum") / num_tokens

        cls = getattr(pipelining, TORCH_COUNTERPART[schedule])
        multi = schedule in ("interleaved", "zb-h1", "zb-v")
        self.sched = cls(stages if multi else stages[0], len(mbs), loss_fn=loss_fn,
                         scale_grads=False)
        self.inputs = torch.cat([mb["input_ids"] for mb in mbs])
        self.target = torch.cat([mb["labels"] for mb in mbs])

    def step(self, meter=None) -> float:
        losses = []
        hooks = meter.hooks() if meter is not None else contextlib.nullcontext()
        with hooks:
            if self.first and self.last:   # the V: input and loss both on rank 0
                self.sched.step(self.inputs, target=self.target, losses=losses)
            elif self.first:
                self.sched.step(self.inputs)
            elif self.last:
                self.sched.step(target=self.target, losses=losses)
            else:
                self.sched.step()
        self.modules.zero_grad(set_to_none=True)
        total = torch.tensor([float(sum(x.item() for x in losses))], dtype=torch.float64)
        dist.all_reduce(total, group=self.state.pp_group)
        return float(total.item())

    def params(self):
        return list(self.modules.parameters())


def single_process_step(model: GLM, mbs, num_tokens) -> float:
    total = 0.0
    for mb in mbs:
        losses = model(mb["input_ids"], position_ids=mb["position_ids"],
                       block_position_ids=mb["block_position_ids"],
                       prefix_lens=mb["prefix_lens"], labels=mb["labels"])
        loss = losses.sum() / num_tokens
        loss.backward()
        total += loss.item()
    model.zero_grad(set_to_none=True)
    return total


# ---- the run --------------------------------------------------------------------------

def row_split(args, cfg, p: int, v: int, schedule: str) -> tuple[int, ...] | None:
    """bench.layer_split for a row of p x v virtual stages as counts; None (skip the
    row) where its explicit counts are for another number of virtual stages, or the
    even split does not divide the layers."""
    split = parse_layer_split(args.bench.layer_split)
    if isinstance(split, tuple) and len(split) != p * v:
        return None
    if split == "even" and cfg.num_layers % (p * v):
        return None
    return resolve_layer_split(cfg, args.bench.seq_len, p, v, schedule, split)


def timed(fn, device, group=None) -> tuple[float, float]:
    """(seconds, result): barrier, run, then the slowest rank's (device) time."""
    dist.barrier(group=group)
    clock = Clock(device)
    with clock.span() as span:
        result = fn()
    t = torch.tensor([span.seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item()), result


def bench(args):
    torch.set_num_threads(args.bench.threads)
    cfg = model_config(args)
    state = init_distributed(ParallelDims(pp=args.bench.pp), timeout=args.bench.timeout_s)
    rank, p, m = state.rank, args.bench.pp, args.bench.num_microbatches
    mbs = make_microbatches(cfg, args)
    num_tokens = int(sum((mb["labels"] != -100).sum() for mb in mbs))
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"model {args.model.preset} (layers={cfg.num_layers}, hidden={cfg.hidden_size}, "
        f"vocab={cfg.padded_vocab_size}), pp={p}, m={m} microbatches of "
        f"{args.bench.micro_batch_size}x{args.bench.seq_len} tokens, "
        f"{args.bench.threads} thread(s)/rank, "
        f"{args.bench.reps} reps")

    per_stage = cfg.num_layers // p
    vpp = args.bench.vpp or next((v for v in range(2, per_stage + 1) if per_stage % v == 0), 0)
    variants = []
    for sched in args.bench.schedules:
        if sched == "interleaved" and (vpp < 2 or m % p):
            say(f"(no interleaved rows: vpp={vpp}, m={m}, pp={p})")
            continue
        v = {"zb-v": 2, "interleaved": vpp}.get(sched, 1)
        split = row_split(args, cfg, p, v, sched)
        if split is None:
            say(f"(no {sched} rows: bench.layer_split={args.bench.layer_split!r} does not "
                f"split layers={cfg.num_layers} into pp*vpp={p * v} virtual stages; try "
                "--model.num_layers or another split)")
            continue
        st = state if v == 1 else init_distributed(ParallelDims(pp=p, vpp=v),
                                                   timeout=args.bench.timeout_s,
                                                   num_layers=cfg.num_layers,
                                                   layer_split=split)
        say(f"{sched} rows: layers per virtual stage {format_split(split)}")
        variants += [Ours(sched, cfg, st, mbs, num_tokens, v, split),
                     Theirs(sched, cfg, st, mbs, num_tokens, v, split)]
    if sched_names := [x.name for x in variants if x.name.startswith("ours interleaved")]:
        say(f"interleaved rows: vpp={vpp} chunks per rank ({sched_names[0]})")
    times = {v.name: [] for v in variants}
    losses = {}
    waits = {v.name: [] for v in variants if isinstance(v, Ours)}   # (wait, step) per rep
    op_times = {name: [] for name in waits}     # per rep: (chunk, kind) -> op seconds
    for rep in range(args.bench.reps + 1):   # round 0 warms up (and lets torch infer shapes)
        for v in variants:
            t, loss = timed(v.step, state.device)
            losses[v.name] = loss
            if rep:
                times[v.name].append(t)
                if v.name in waits:
                    waits[v.name].append((v.stats.comm_wait_s, t))
                    op_times[v.name].append(v.stats.op_seconds())

    # single process: the whole model on rank 0 (bench.threads threads), the others idle at
    # the barrier; the pipeline uses p times as many cores
    ts = []
    full = GLM.build(cfg, seed=0) if rank == 0 else None
    for rep in range(args.bench.reps + 1):
        dist.barrier()
        if rank == 0:
            clock = Clock(state.device)
            with clock.span() as span:
                losses["single process"] = single_process_step(full, mbs, num_tokens)
            if rep:
                ts.append(span.seconds)
        dist.barrier()
    single = statistics.median(ts) if rank == 0 else 0.0

    # stage 0 activation memory: one metered step per variant
    mem = {}
    for v in variants:
        meter = SavedActivationMeter(v.params())
        dist.barrier()
        v.step(meter=meter)
        mem[v.name] = meter.peak

    # ---- report -----------------------------------------------------------------------
    fracs = {}
    for name, rows in waits.items():
        wait_frac = torch.tensor([statistics.median(w / t for w, t in rows)])
        gathered = [torch.zeros(1) for _ in range(p)]
        dist.all_gather(gathered, wait_frac, group=state.pp_group)
        fracs[name] = [float(x.item()) for x in gathered]
    ideal = {}   # name -> per rep (ideal step, idle per stage)
    for v in variants:
        if isinstance(v, Ours):
            ideal[v.name] = []
            for rep_ops in op_times[v.name]:
                # this rep's mean per op kind: the rep's step is held against the step
                # its own ops would make with free transfers
                costs = {key: statistics.fmean(x) for key, x in rep_ops.items()}
                gathered = [None] * p
                dist.all_gather_object(gathered, costs, group=state.pp_group)
                ideal[v.name].append(simulate_measured(v.schedule, p, m, len(v.chunks),
                                                       gathered))
    if rank == 0:
        report(args, cfg, times, single, losses, fracs, mem, [v.name for v in variants],
               ideal)
    dist.barrier()


def report(args, cfg, times, single, losses, fracs, mem, names, ideal):
    p, m = args.bench.pp, args.bench.num_microbatches
    tokens = m * args.bench.micro_batch_size * args.bench.seq_len   # random ids: no padding
    say = print
    med = {k: statistics.median(x) for k, x in times.items()}
    spread = {k: (max(x) - min(x)) / statistics.median(x) for k, x in times.items()}
    say("\nstep time (median, slowest rank; spread = (max - min) / median over reps) and "
        "throughput")
    say(f"  {'single process':28s} {single * 1e3:8.1f} ms {tokens / single:9.0f} tok/s   "
        f"loss {losses['single process']:.6f}")
    for name, t in med.items():
        say(f"  {name:28s} {t * 1e3:8.1f} ms {tokens / t:9.0f} tok/s   loss "
            f"{losses[name]:.6f}   spread {spread[name]:.2f}")
    say("\nours vs PyTorch (time ratio ours/theirs)")
    for name in med:
        if name.startswith("ours "):
            sched = name[5:]
            r = med[name] / med[f"torch {sched}"]
            say(f"  {sched:12s} {r:.3f}  vs torch {TORCH_COUNTERPART[sched]} (throughput "
                f"ours/theirs {1 / r:.3f})")
    if "ours 1f1b" in med:
        say(f"  our 1F1B at pp={p} ({p} processes) vs the single process: "
            f"{single / med['ours 1f1b']:.2f}x its throughput (ideal "
            f"{p * (m / (m + p - 1)):.2f}x on idle cores)")
    say("\nbubble (ours): time blocked on transfers / step time, per stage; mean")
    textbook = {"1f1b": (p - 1) / (m + p - 1), "gpipe": (p - 1) / (m + p - 1),
                "zb-h1": (p - 1) / (3 * m + p - 1), "zb-v": (p - 1) / (6 * m + p - 1)}
    for name, f in fracs.items():
        sched = name[5:]
        extra = f" (textbook {textbook[sched]:.3f})" if sched in textbook else ""
        say(f"  {sched:12s} {', '.join(f'{x:.3f}' for x in f)}; mean "
            f"{statistics.mean(f):.3f}{extra}")
    say("\nideal step (engine.pipeline.sim: each schedule's programs with the op times our "
        "ranks measured in it, transfers free)")
    for name, reps in ideal.items():
        sched = name[5:]
        t = statistics.median(x for x, _ in reps)
        idle = [statistics.median(i[s] for _, i in reps) for s in range(p)]
        # rep by rep for ours (its own ops); torch's rep r against our rep r's ideal
        ours = statistics.median(a / b for a, (b, _) in zip(times[name], reps))
        theirs = statistics.median(a / b for a, (b, _) in zip(times[f"torch {sched}"], reps))
        # the best ours/theirs any executor of this schedule could show with these op
        # times: our ideal against torch's measured step, rep by rep
        bound = statistics.median(b / a for a, (b, _) in zip(times[f"torch {sched}"], reps))
        say(f"  {sched:12s} {t * 1e3:8.1f} ms, idle per stage "
            f"{', '.join(f'{x:.3f}' for x in idle)}; measured / ideal: ours "
            f"{ours:.3f}, torch {theirs:.3f}; at zero overhead ours / torch {bound:.3f}")
    if "ours 1f1b" in ideal:
        t = statistics.median(x for x, _ in ideal["ours 1f1b"])
        say(f"  single process / ideal 1F1B: {single / t:.2f}x, the most a 1F1B over this "
            "split can reach with these op times")
    say("\nstage 0 peak activation memory (saved-for-backward storages + held outputs; "
        "ZB: + the (X, dY) pairs waiting for W)")
    for name in names:
        say(f"  {name:28s} {mem[name] / 2**20:8.2f} MiB")
    if "ours gpipe" in mem:
        for sched in ("1f1b", "zb-h1", "zb-v"):
            if f"ours {sched}" in mem:
                ratio = mem[f"ours {sched}"] / mem["ours gpipe"]
                say(f"  ours {sched} / GPipe = {ratio:.3f}; target <= p/m + 10% = "
                    f"{p / m * 1.1:.3f} ({'met' if ratio <= p / m * 1.1 else 'NOT met'})")
    say("  (torch rows: saved tensors only; its schedules also keep each in-flight output, "
        "which the hooks do not see)")


# ---- processes ------------------------------------------------------------------------

def _spawned(rank, world, args):
    bench(args)


def run(args):
    if "RANK" in os.environ:          # under torchrun: the environment names the group
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.bench.timeout_s))
        try:
            bench(args)
        finally:
            dist.destroy_process_group()
        return
    # torch's default thread count per worker, as under torchrun
    run_workers(_spawned, args.bench.pp, args, timeout=None, pg_timeout=args.bench.timeout_s,
                threads=None)



def main(argv=None):
    return COMMAND.main(run, argv)


if __name__ == "__main__":
    run_main(main)
