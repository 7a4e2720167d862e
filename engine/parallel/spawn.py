"""Spawn a gloo process group on 127.0.0.1, with a deadline so a hang fails loudly.

    results = run_workers(fn, world_size, *args, timeout=60)

The one spawner for tests (tests/dist.py) and the command-line tools that launch their
own workers (runners/validate_planner.py, runners/bench_pipeline.py). `fn(rank,
world_size, *args)` must be a module-level function (spawned processes import it by
name). Each worker gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set like
torchrun, an initialised gloo default group and, by default, one intra-op thread (2
cores, up to 4 processes). Returns the per-rank return values; a worker exception
re-raises here with the rank's traceback; a deadline kills every worker and fails naming
the ranks still running.
"""
from __future__ import annotations

import io
import os
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode(value: bytes):
    """A worker's result as it returned it (workers ship torch.save bytes)."""
    return torch.load(io.BytesIO(value), weights_only=False)


def _entry(fn, rank, world_size, port, queue, args, pg_timeout, threads):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=pg_timeout))
        result = fn(rank, world_size, *args)
        # as bytes: tensors sent as-is travel through shared memory that vanishes when
        # this process exits, possibly before the parent has read them
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - ship every failure to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_workers(fn, world_size: int, *args, timeout: float | None = 120.0,
                  pg_timeout: float = 60.0, tolerate_deaths: bool = False,
                  threads: int | None = 1):
    """Run the workers; returns ({rank: (ok, value or traceback)}, exit codes).

    timeout: seconds for the whole job (None: no deadline; the groups' pg_timeout still
    bounds every collective). threads: each worker's intra-op threads (None: torch's
    default). Without tolerate_deaths, a failing, dying or late worker raises here at
    once. With it (fault tests), failures and deaths are results: collection ends when
    every rank has reported or every process has exited."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, daemon=True,
                         args=(fn, r, world_size, port, queue, args, pg_timeout, threads))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while len(results) < world_size:
            if not queue.empty():
                rank, ok, value = queue.get()
                if not ok and not tolerate_deaths:
                    raise AssertionError(f"rank {rank} failed:\n{value}")
                results[rank] = (ok, decode(value) if ok else value)
                continue
            if deadline is not None and time.monotonic() > deadline:
                if tolerate_deaths:
                    break
                missing = sorted(set(range(world_size)) - set(results))
                raise AssertionError(f"timeout after {timeout:.0f}s: ranks {missing} still running")
            dead = [r for r, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and r not in results]
            if dead and queue.empty() and not tolerate_deaths:
                raise AssertionError(f"ranks {dead} died (exit codes "
                                     f"{[procs[r].exitcode for r in dead]}) without a result")
            if tolerate_deaths and queue.empty() and all(not p.is_alive() for p in procs):
                break
            time.sleep(0.02)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return results, [p.exitcode for p in procs]


def run_workers(fn, world_size: int, *args, timeout: float | None = 120.0,
                pg_timeout: float = 60.0, threads: int | None = 1):
    """Per-rank return values, in rank order; any failure, death or hang raises."""
    results, _ = spawn_workers(fn, world_size, *args, timeout=timeout, pg_timeout=pg_timeout,
                               threads=threads)
    return [results[r][1] for r in range(world_size)]
