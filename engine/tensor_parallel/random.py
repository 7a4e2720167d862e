"""Dropout randomness under tensor parallelism.

Two kinds of tensors get dropout:
  replicated on every TP rank (the residual stream without sequence parallelism): every
      rank must drop the same elements, or the replicas diverge. They draw from torch's
      default generator, which is therefore seeded identically on all TP ranks.
  sharded across TP ranks (attention heads, FFN channels, and with sequence parallelism
      the residual stream's sequence shards): each rank must draw its own mask, or the
      shards' masks repeat. They draw inside `tracker.fork()`, a generator state seeded
      from (seed, tp_rank).

The tracker swaps the device's default generator state in and out (F.dropout takes no
generator), so a region's stream continues across calls and the default stream is left
exactly where it was.

    tracker = seed_tensor_parallel(seed, tp_rank)
    with tracker.fork():
        y = F.dropout(sharded, p)

Activation recomputation must restore the tracker's states as well as the default one
before replaying a region (torch.utils.checkpoint only restores the default).
"""
from __future__ import annotations

import contextlib

import torch

TP_RNG = "tensor-parallel"


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def tp_rng_seed(seed: int, tp_rank: int) -> int:
    """The sharded-region seed: distinct per TP rank and from the default seed itself."""
    return (seed * 1_000_003 + 2718 + 7919 * tp_rank) % (2 ** 63)


class RNGTracker:
    """Named generator states for one device."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int):
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        self.states[name] = torch.Generator(self.device).manual_seed(int(seed)).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = TP_RNG):
        if name not in self.states:
            raise ValueError(f"unknown RNG state {name!r}; known: {sorted(self.states)}")
        outside = _get_state(self.device)
        _set_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(outside, self.device)

    # ---- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]):
        self.states = {k: v.clone() for k, v in states.items()}


def seed_tensor_parallel(seed: int, tp_rank: int, device="cpu") -> RNGTracker:
    """Seed the default generator with `seed` (the same on every TP rank: replicated
    regions) and return a tracker whose TP_RNG state is seeded from (seed, tp_rank)."""
    torch.manual_seed(seed)  # CPU and every CUDA device
    tracker = RNGTracker(device)
    tracker.add(TP_RNG, tp_rng_seed(seed, tp_rank))
    return tracker
