"""Which examples share a packed row (model/masks.py `pack`): best-fit decreasing over
windows of the epoch's order, so rows come out nearly full while the data order stays
shuffled at the scale of a window.

A pure function of (lengths, capacity, window, seed): a run resumes from the step alone.
"""
from __future__ import annotations

import numpy as np


def best_fit_rows(lengths, capacity: int, window: int = 1024,
                  rng: np.random.Generator | None = None) -> list[list[int]]:
    """Rows of item indices (into `lengths`) each holding at most `capacity` tokens.

    Items are taken `window` at a time in the given order; inside a window, longest
    first, each goes to the open row it fills best (least room left), or to a new row.
    Rows of a window are then shuffled with `rng` (if given), so long and short items do
    not arrive in sorted runs. Room is an integer <= capacity: rows are kept in buckets by
    room, and the best fit is a scan over at most `capacity` buckets."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if capacity <= 0:
        raise ValueError(f"capacity={capacity} must be positive")
    if window <= 0:
        raise ValueError(f"window={window} must be positive")
    if lengths.size and (lengths.max() > capacity or lengths.min() <= 0):
        bad = int(lengths[(lengths > capacity) | (lengths <= 0)][0])
        raise ValueError(f"an item of {bad} tokens does not fit a row of {capacity}")
    out: list[list[int]] = []
    for w0 in range(0, lengths.size, window):
        idx = np.arange(w0, min(lengths.size, w0 + window))
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        rows: list[list[int]] = []
        by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room -> open rows
        for i in idx.tolist():
            n = int(lengths[i])
            for room in range(n, capacity + 1):
                if by_room[room]:
                    row = by_room[room].pop()
                    break
            else:
                row, room = len(rows), capacity
                rows.append([])
            rows[row].append(i)
            by_room[room - n].append(row)
        if rng is not None:
            rows = [rows[k] for k in rng.permutation(len(rows))]
        out.extend(rows)
    return out
