"""Optimizer checkpoints that do not depend on the layout they were saved from.

Two formats come in:
  shard dicts   one per old dp rank (DistributedOptimizer.state_dict): fp32 flat slices
                plus a parameter table (name, shape, global offset) and where the slices
                sit: "shard" [lo, hi) for one flat range, or "pieces" [lo, hi, shard lo];
  full state    {"params": {name: {"master", "exp_avg", "exp_avg_sq"}}, scalars}.
Both become a *source* that reads any element range of any parameter, so the loader
only asks "elements [lo, hi) of parameter X" for the pieces its own shard needs.
"""
from __future__ import annotations

import torch

from engine.optim.layout import intersect

FORMAT = "glm-distopt-1"
KEYS = ("master", "exp_avg", "exp_avg_sq")
SCALARS = ("step", "loss_scale", "clean_steps", "precision")


class _Source:
    scalars: dict
    shapes: dict[str, tuple[int, ...]]

    def read(self, key: str, name: str, lo: int, hi: int) -> torch.Tensor:
        raise NotImplementedError

    def check_params(self, wanted: list[tuple[str, tuple[int, ...]]]):
        missing = [n for n, _ in wanted if n not in self.shapes]
        if missing:
            raise ValueError(f"optimizer state lacks {len(missing)} parameter(s): "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        for name, shape in wanted:
            if tuple(self.shapes[name]) != tuple(shape):
                raise ValueError(f"optimizer state for {name} has shape "
                                 f"{tuple(self.shapes[name])}, the model has {tuple(shape)}")


class FullSource(_Source):
    def __init__(self, state: dict):
        self.params = state["params"]
        self.scalars = {k: state[k] for k in SCALARS if k in state}
        self.scalars.setdefault("step", 0)
        self.shapes = {n: tuple(t["master"].shape) for n, t in self.params.items()}

    def read(self, key, name, lo, hi):
        return self.params[name][key].reshape(-1)[lo:hi]


class ShardSource(_Source):
    def __init__(self, shards: list[dict]):
        if not shards:
            raise ValueError("optimizer state: empty list of shard dicts")
        for i, sd in enumerate(shards):
            if sd.get("meta", {}).get("format") != FORMAT:
                raise ValueError(f"optimizer shard {i} is not a {FORMAT} state dict")
        table = shards[0]["meta"]["params"]
        for i, sd in enumerate(shards[1:], 1):
            if sd["meta"]["params"] != table:
                raise ValueError(f"optimizer shard {i} was saved from a different parameter "
                                 "layout than shard 0 (mixed checkpoints?)")
        self.shards = shards
        self.table = {e["name"]: e for e in table}
        self.shapes = {e["name"]: tuple(e["shape"]) for e in table}
        self.scalars = {k: shards[0]["meta"][k] for k in SCALARS if k in shards[0]["meta"]}
        self._check_coverage()

    @staticmethod
    def _pieces(sd: dict) -> list[tuple[int, int, int]]:
        meta = sd["meta"]
        if "pieces" in meta:
            return [tuple(p) for p in meta["pieces"]]
        lo, hi = meta["shard"]
        return [(lo, hi, 0)]

    def _check_coverage(self):
        covered: list[tuple[int, int]] = []
        for lo, hi in sorted((lo, hi) for sd in self.shards for lo, hi, _ in self._pieces(sd)):
            if covered and lo <= covered[-1][1]:
                covered[-1] = (covered[-1][0], max(covered[-1][1], hi))
            else:
                covered.append((lo, hi))
        for e in self.table.values():
            lo, hi = e["offset"], e["offset"] + e["numel"]
            if e["numel"] and not any(a <= lo and hi <= b for a, b in covered):
                raise ValueError(f"optimizer shards do not cover parameter {e['name']}: pass "
                                 "the state dicts of all the old data-parallel ranks")

    def read(self, key, name, lo, hi):
        e = self.table[name]
        glo, ghi = e["offset"] + lo, e["offset"] + hi
        out = torch.empty(hi - lo, dtype=torch.float32)
        for sd in self.shards:
            for flo, fhi, s0 in self._pieces(sd):
                cut = intersect(glo, ghi, flo, fhi)
                if cut:
                    out[cut[0] - glo:cut[1] - glo] = \
                        sd[key][s0 + cut[0] - flo:s0 + cut[1] - flo]
        return out


def make_source(state) -> _Source:
    if isinstance(state, dict) and "params" in state:
        return FullSource(state)
    if isinstance(state, dict):
        return ShardSource([state])
    return ShardSource(list(state))


def merge_shards(shards: list[dict]) -> dict:
    """Every old rank's shard dicts -> the full, layout-free state (no process group)."""
    src = ShardSource(list(shards))
    params = {name: {k: src.read(k, name, 0, e["numel"]).view(tuple(e["shape"]))
                     for k in KEYS} for name, e in src.table.items()}
    return {"params": params, **src.scalars}
