"""Benchmark the pipeline schedules on gloo/CPU against a single process and against
PyTorch's own torch.distributed.pipelining counterparts, on the same model, data, stage
split and microbatches:

    ours 1f1b         torch Schedule1F1B
    ours gpipe        torch ScheduleGPipe
    ours interleaved  torch ScheduleInterleaved1F1B       (vpp chunks per rank, --vpp)
    ours zb-h1        torch ScheduleInterleavedZeroBubble (one stage per rank: torch's
                      zero-bubble schedule closest to ZB-H1; ScheduleZBVZeroBubble needs
                      the V placement of two chunks per rank)
    ours zb-v         torch ScheduleZBVZeroBubble         (two chunks per rank in the V;
                      needs layers % 2pp == 0, e.g. --layers 8 at pp=2: not in the default
                      --schedules, the small preset's 6 layers do not split in 4)

    python runners/bench_pipeline.py                       # spawns --pp processes itself
    torchrun --nproc_per_node 2 runners/bench_pipeline.py  # or under torchrun

Prints, from rank 0:
  * step time (median over --reps, max over ranks) and tokens/s of every variant;
    the single-process baseline (whole model, gradient accumulation over the same
    microbatches) runs on rank 0 alone while the other ranks wait;
  * ours / PyTorch time ratios (target: our 1F1B at least 0.95x PyTorch's throughput);
  * the measured bubble: per rank, time blocked in exchanges / step time, against the
    textbook (p-1)/(m+p-1);
  * stage 0's peak activation memory, 1F1B against GPipe: live bytes of tensors saved
    for backward (distinct storages, parameters excluded; saved-tensor hooks, see
    engine.pipeline.stats.SavedActivationMeter) plus the stage outputs the schedule holds.
    Target: 1F1B <= (p/m) * GPipe + 10%.
Variants run interleaved (A B C D, A B C D, ...) after one untimed warmup round, so
drift on a shared machine hits them alike.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.parallel.spawn import run_workers
from engine.pipeline.p2p import P2P
from engine.parallel.state import ParallelDims, init_distributed
from engine.pipeline.schedules import StepContext, forward_backward
from engine.pipeline.stage import build_stage
from engine.pipeline.stats import SavedActivationMeter, ScheduleStats
from engine.timing import Clock
from model import GLM, GLMConfig
from engine.errors import run_main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model")
    g.add_argument("--preset", default="small", help="GLMConfig preset")
    g.add_argument("--layers", type=int, default=0, help="override num_layers (0: preset)")
    g.add_argument("--vocab", type=int, default=2048,
                   help="override padded_vocab_size (0: preset); 2048 keeps the output head "
                        "from doubling the last stage's work on the small preset")
    g = ap.add_argument_group("data and schedule")
    g.add_argument("--pp", type=int, default=2, help="pipeline stages (spawned processes)")
    g.add_argument("--microbatches", type=int, default=8, help="m, per step")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--vpp", type=int, default=0,
                   help="chunks per rank for the interleaved rows (0: the smallest >= 2 "
                        "that divides the layers per stage; none: no interleaved rows)")
    g.add_argument("--schedules", default="1f1b,gpipe,zb-h1,interleaved",
                   help="comma-separated schedules to run (each ours and torch's)")
    g = ap.add_argument_group("measurement")
    g.add_argument("--reps", type=int, default=5, help="timed rounds (median reported)")
    g.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    g.add_argument("--timeout", type=float, default=300.0, help="collective/P2P timeout, s")
    return ap.parse_args(argv)


def model_config(args) -> GLMConfig:
    over = {}
    if args.layers:
        over["num_layers"] = args.layers
    if args.vocab:
        over["padded_vocab_size"] = args.vocab
    return GLMConfig.preset(args.preset, **over)


def make_microbatches(cfg: GLMConfig, args) -> list[dict]:
    """Causal LM microbatches (positions 0..s-1, no prefix), the same on every rank."""
    g = torch.Generator().manual_seed(0)
    b, s = args.micro_batch_size, args.seq_len
    out = []
    for _ in range(args.microbatches):
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
    def __init__(self, schedule, cfg, state, mbs, num_tokens, vpp=1):
        self.name = f"ours {schedule}"
        self.schedule, self.state, self.mbs, self.num_tokens = schedule, state, mbs, num_tokens
        self.chunks = build_stage(cfg, state.dims.pp, vpp, state.stage, seed=0,
                                  schedule=schedule)
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
    def __init__(self, schedule, cfg, state, mbs, num_tokens, vpp=1):
        import torch.distributed.pipelining as pipelining
        from torch.distributed.pipelining import PipelineStage
        self.name = f"torch {schedule}"
        self.state = state
        p = state.dims.pp
        from engine.pipeline.placement import placement_for
        place = placement_for(schedule, p, vpp)   # zb-v: the same V as ours
        chunks = build_stage(cfg, p, vpp, state.stage, seed=0, schedule=schedule)
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
    torch.set_num_threads(args.threads)
    cfg = model_config(args)
    state = init_distributed(ParallelDims(pp=args.pp), timeout=args.timeout,
                             num_layers=cfg.num_layers)
    rank, p, m = state.rank, args.pp, args.microbatches
    mbs = make_microbatches(cfg, args)
    num_tokens = int(sum((mb["labels"] != -100).sum() for mb in mbs))
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"model {args.preset} (layers={cfg.num_layers}, hidden={cfg.hidden_size}, "
        f"vocab={cfg.padded_vocab_size}), pp={p}, m={m} microbatches of "
        f"{args.micro_batch_size}x{args.seq_len} tokens, {args.threads} thread(s)/rank, "
        f"{args.reps} reps")

    per_stage = cfg.num_layers // p
    vpp = args.vpp or next((v for v in range(2, per_stage + 1) if per_stage % v == 0), 0)
    variants = []
    for sched in args.schedules.split(","):
        if sched == "interleaved" and (vpp < 2 or m % p):
            say(f"(no interleaved rows: vpp={vpp}, m={m}, pp={p})")
            continue
        v, st = 1, state
        if sched == "zb-v":
            if cfg.num_layers % (2 * p):
                say(f"(no zb-v rows: layers={cfg.num_layers} do not split into 2pp={2 * p} "
                    "virtual stages; try --layers)")
                continue
            v, st = 2, init_distributed(ParallelDims(pp=p, vpp=2), timeout=args.timeout,
                                        num_layers=cfg.num_layers)
        if sched == "interleaved":
            v, st = vpp, init_distributed(ParallelDims(pp=p, vpp=vpp), timeout=args.timeout,
                                          num_layers=cfg.num_layers)
        variants += [Ours(sched, cfg, st, mbs, num_tokens, v),
                     Theirs(sched, cfg, st, mbs, num_tokens, v)]
    if sched_names := [x.name for x in variants if x.name.startswith("ours interleaved")]:
        say(f"interleaved rows: vpp={vpp} chunks per rank ({sched_names[0]})")
    times = {v.name: [] for v in variants}
    losses = {}
    waits = {v.name: [] for v in variants if isinstance(v, Ours)}   # (wait, step) per rep
    for rep in range(args.reps + 1):          # round 0 warms up (and lets torch infer shapes)
        for v in variants:
            t, loss = timed(v.step, state.device)
            losses[v.name] = loss
            if rep:
                times[v.name].append(t)
                if v.name in waits:
                    waits[v.name].append((v.stats.comm_wait_s, t))

    # single process: the whole model on rank 0 (--threads threads), the others idle at
    # the barrier; the pipeline uses p times as many cores
    ts = []
    full = GLM.build(cfg, seed=0) if rank == 0 else None
    for rep in range(args.reps + 1):
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
    if rank == 0:
        report(args, cfg, times, single, losses, fracs, mem, [v.name for v in variants])
    dist.barrier()


def report(args, cfg, times, single, losses, fracs, mem, names):
    p, m = args.pp, args.microbatches
    tokens = m * args.micro_batch_size * args.seq_len   # random ids: no padding
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


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ:          # under torchrun: the environment names the group
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
        try:
            bench(args)
        finally:
            dist.destroy_process_group()
        return
    # torch's default thread count per worker, as under torchrun
    run_workers(_spawned, args.pp, args, timeout=None, pg_timeout=args.timeout, threads=None)


if __name__ == "__main__":
    run_main(main)
