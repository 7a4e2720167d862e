"""Test helpers for multi-process tests: the gloo spawner (engine/parallel/spawn.py, also
used by the runners that launch their own workers) and a one-thread reference context.

    results = run_workers(fn, world_size, *args, timeout=60)
"""
from __future__ import annotations

import contextlib

import torch

from engine.parallel.spawn import free_port, run_workers, spawn_workers  # noqa: F401


@contextlib.contextmanager
def one_thread():
    """Run a single-process reference with the workers' one intra-op thread: a matmul
    split over another thread count sums in another order, and at fp32 that alone moves
    Adam's updates by ~1e-5 relative, the size of the parity tolerances."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
