"""Figure 3: training time per epoch against batch size, for no pipeline (one process,
gradient accumulation over the same microbatches, all threads) and 2-stage GPipe, 1F1B and
interleaved 1F1B (the smallest vpp >= 2 that splits the layers evenly: 2 for 4 or 8
layers, 3 for the small preset's 6) on gloo, one process per stage with one thread each.

Measured with the engine itself (engine.pipeline.schedules.forward_backward over build_stage chunks
and engine.pipeline.p2p.P2P): the median over `reps` timed steps (after one warm-up step) of one
forward + backward over a global batch, times the number of steps in an epoch of
`epoch_samples` sequences. The optimizer update is left out: it is the same work in every
variant. Inputs are random token ids with a label on every position: the cost of a step
does not depend on the token values."""
from __future__ import annotations

import math
import os
import queue as queue_lib
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def _batches(cfg, n: int, mbs: int, seq_len: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(16, cfg.padded_vocab_size, (mbs, seq_len), generator=g)
        out.append({"input_ids": ids, "position_ids": torch.arange(seq_len).expand(mbs, -1),
                    "block_position_ids": torch.zeros(mbs, seq_len, dtype=torch.long),
                    "prefix_lens": torch.zeros(mbs, dtype=torch.long),
                    "labels": torch.randint(16, cfg.padded_vocab_size, (mbs, seq_len),
                                            generator=g)})
    return out


def _time_steps(step, reps: int) -> float:
    step()  # warm-up: allocator, first-call overheads
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_no_pipeline(cfg, batch_sizes, mbs, seq_len, reps, threads) -> dict:
    from engine.pipeline.schedules import StepContext, forward_backward
    from engine.pipeline.stage import build_stage
    # the caller's thread count comes back afterwards: the report runs this in-process
    # between stages (and a test after it would otherwise sum in another order)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        chunks = build_stage(cfg, 1, 1, 0, seed=0)
        out = {}
        for b in batch_sizes:
            mbatches = _batches(cfg, b // mbs, mbs, seq_len, seed=b)
            n_tok = sum(int(x["labels"].numel()) for x in mbatches)
            out[b] = _time_steps(
                lambda: forward_backward(StepContext("none", chunks, mbatches, n_tok)), reps)
    finally:
        torch.set_num_threads(before)
    return out


def interleave_vpp(num_layers: int, pp: int = 2) -> int:
    """Virtual stages per rank for the interleaved variant: the smallest v >= 2 with
    num_layers divisible by pp * v (one layer per chunk at most)."""
    for v in range(2, num_layers // pp + 1):
        if num_layers % (pp * v) == 0:
            return v
    raise ValueError(f"Figure 3: num_layers={num_layers} cannot be split into pp={pp} x "
                     "vpp>=2 equal chunks for interleaved 1F1B; use a preset with an even "
                     "number of layers >= 4")


def _worker(rank, cfg, batch_sizes, mbs, seq_len, reps, port, queue):
    from engine.pipeline.p2p import P2P
    from engine.parallel.state import ParallelDims, init_distributed
    from engine.pipeline.schedules import StepContext, forward_backward
    from engine.pipeline.stage import build_stage
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=120))
    try:
        result = {}
        for schedule in SCHEDULES:
            vpp = interleave_vpp(cfg.num_layers) if schedule == "interleaved" else 1
            state = init_distributed(ParallelDims(pp=2, vpp=vpp), timeout=120,
                                     num_layers=cfg.num_layers)
            chunks = build_stage(cfg, 2, vpp, state.coords.pp, seed=0)
            comm = P2P(state, cfg.hidden_size)
            for b in batch_sizes:
                mbatches = _batches(cfg, b // mbs, mbs, seq_len, seed=b)
                n_tok = sum(int(x["labels"].numel()) for x in mbatches)

                def step():
                    forward_backward(StepContext(schedule, chunks, mbatches, n_tok, comm, state))
                    dist.barrier()   # a step ends when the slowest stage is done
                result[(schedule, b)] = _time_steps(step, reps)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def measure(cfg, batch_sizes, micro_batch, seq_len, reps, epoch_samples, threads=2) -> dict:
    """{variant: {batch size: seconds per epoch}} plus the per-step seconds."""
    step_s = {"no pipeline": time_no_pipeline(cfg, batch_sizes, micro_batch, seq_len, reps,
                                              threads)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, cfg, batch_sizes, micro_batch, seq_len,
                                                reps, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = None
    try:
        deadline = time.monotonic() + 1800
        while result is None:
            try:
                result = queue.get(timeout=1.0)
            except queue_lib.Empty:
                # a dead worker never puts a result: stop at once instead of at the deadline
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"Figure 3 workers failed: exit codes "
                                       f"{[p.exitcode for p in procs]}") from None
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    names = {"gpipe": "GPipe (pp=2)", "1f1b": "1F1B (pp=2)",
             "interleaved": f"interleaved 1F1B (pp=2, vpp={interleave_vpp(cfg.num_layers)})"}
    for (schedule, b), t in result.items():
        step_s.setdefault(names[schedule], {})[b] = t
    epoch = {v: {b: t * math.ceil(epoch_samples / b) for b, t in d.items()}
             for v, d in step_s.items()}
    return {"step_seconds": step_s, "epoch_seconds": epoch, "epoch_samples": epoch_samples,
            "micro_batch": micro_batch, "seq_len": seq_len, "reps": reps}
