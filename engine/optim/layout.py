"""Where each parameter lives in one flat index space, and how that space is cut into
gradient buckets (for the data-parallel reduction) and per-rank shards (for ZeRO).

Pure integer bookkeeping, no tensors and no process group, so it is tested on its own.

    flat space: [ p_last | p_last-1 | ... | p_0 | pad ]     (each start aligned)
    buckets:    [ b0        | b1         | ... | b_k       ]  b0 is reduced first
    shards:     [ r0 | r1 | .. ][ r0 | r1 | .. ] ...           an equal slice of every bucket

Each rank owns the same-sized r-th slice of every bucket (buckets are padded to a multiple
of the shard count), so a bucket's reduction is one even `reduce_scatter_tensor` and the
parameter gather one `all_gather_into_tensor` per bucket. A rank's shard is the
concatenation of its slices, in bucket order ("shard-local" offsets index it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Every parameter starts on a multiple of ALIGN elements: views into the flat buffers stay
# 128-byte aligned even in 16-bit dtypes, which vectorised kernels prefer. The gaps are
# never written, so they hold zeros in every buffer and never touch the update or norm.
ALIGN = 64


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def intersect(lo: int, hi: int, lo2: int, hi2: int) -> tuple[int, int] | None:
    a, b = max(lo, lo2), min(hi, hi2)
    return (a, b) if a < b else None


@dataclass(frozen=True)
class Slot:
    """One parameter's place in the flat space."""
    index: int                  # position in the optimizer's parameter list
    name: str
    shape: tuple[int, ...]
    offset: int                 # first element in the flat space
    numel: int
    bucket: int

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class BucketSpan:
    index: int
    start: int                  # [start, end) of the flat space
    end: int
    slots: tuple[int, ...]      # parameter indices stored in this bucket

    @property
    def size(self) -> int:
        return self.end - self.start


class FlatLayout:
    def __init__(self, named_shapes: list[tuple[str, tuple[int, ...]]], bucket_numel: int,
                 shard_world: int = 1, align: int = ALIGN):
        if shard_world < 1:
            raise ValueError(f"shard_world={shard_world} must be >= 1")
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel={bucket_numel} must be >= 1")
        n = len(named_shapes)
        self.shard_world = shard_world
        slots: list[Slot | None] = [None] * n
        buckets: list[BucketSpan] = []
        members: list[int] = []
        offset = start = 0
        # a bucket holds shard_world equal slices, each starting aligned
        unit = align * shard_world
        # Reverse order: backward produces the last parameters' gradients first, so the
        # first bucket fills (and its reduction starts) while backward is still running.
        for i in reversed(range(n)):
            name, shape = named_shapes[i]
            numel = math.prod(shape)
            slots[i] = Slot(i, name, tuple(shape), offset, numel, len(buckets))
            members.append(i)
            offset = _round_up(offset + numel, align)
            if offset - start >= bucket_numel:
                offset = _round_up(offset, unit)
                buckets.append(BucketSpan(len(buckets), start, offset, tuple(members)))
                members, start = [], offset
        self.total = max(_round_up(offset, unit), unit)
        if members or not buckets:
            buckets.append(BucketSpan(len(buckets), start, self.total, tuple(members)))
        self.slots: list[Slot] = slots  # type: ignore[assignment]
        self.buckets = buckets
        self.shard_size = self.total // shard_world

    # ---- shards ------------------------------------------------------------------------
    def slice_size(self, b: int) -> int:
        """Elements of bucket b each rank owns."""
        return self.buckets[b].size // self.shard_world

    def shard_range(self, rank: int) -> tuple[int, int]:
        """`rank`'s range in the shard-major order (every rank's shard in turn); with one
        shard it is the flat range. The flat ranges are `shard_flat_ranges`."""
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def bucket_owners(self, b: int) -> list[tuple[int, int, int]]:
        """(owner rank, lo, hi) with [lo, hi) bucket-local: who receives which part of
        bucket b in a reduce-scatter (equal parts, in rank order)."""
        n = self.slice_size(b)
        return [(r, r * n, (r + 1) * n) for r in range(self.shard_world)]

    def shard_pieces(self, rank: int) -> list[tuple[int, int, int, int, int]]:
        """(bucket, blo, bhi, slo, shi): the parts of `rank`'s shard held by each bucket,
        bucket-local [blo, bhi) and shard-local [slo, shi)."""
        out, slo = [], 0
        for span in self.buckets:
            n = self.slice_size(span.index)
            out.append((span.index, rank * n, (rank + 1) * n, slo, slo + n))
            slo += n
        return out

    def shard_flat_ranges(self, rank: int) -> list[tuple[int, int, int]]:
        """(lo, hi, slo): flat [lo, hi) is shard-local [slo, slo + hi - lo) of `rank`."""
        return [(self.buckets[b].start + blo, self.buckets[b].start + bhi, slo)
                for b, blo, bhi, slo, _ in self.shard_pieces(rank)]

    def param_segments(self, rank: int) -> list[tuple[Slot, int, int, int]]:
        """(slot, plo, phi, slo): elements [plo, phi) of the flattened parameter sit at
        shard-local offset slo of `rank`'s shard."""
        ranges = self.shard_flat_ranges(rank)
        out = []
        for slot in self.slots:
            lo, hi, slo = ranges[slot.bucket]
            cut = intersect(slot.offset, slot.end, lo, hi)
            if cut:
                out.append((slot, cut[0] - slot.offset, cut[1] - slot.offset,
                            slo + cut[0] - lo))
        return out

    def describe(self) -> list[dict]:
        """JSON-able parameter table for checkpoint metadata."""
        return [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "numel": s.numel}
                for s in self.slots]
