"""How many layers each virtual pipeline stage holds (`parallel.layer_split`).

    "even"      num_layers / (pp * vpp) each; needs the division to be exact (the default)
    "balanced"  computed from the stages' costs (engine/train/layer_split.py), then counts
    "5,3"       explicit: the layers of each VIRTUAL stage in pipeline order, virtual stage 0
                being the one with the embedding (for ZB-V's V: down the ranks and back up)

Layer modules are keyed by global index, so a split only decides which contiguous
[start, end) range each virtual stage builds; every placement (engine/pipeline/placement.py)
asks `layer_ranges` for them. Pure integer math, no torch.
"""
from __future__ import annotations

WORDS = ("even", "balanced")


def parse_layer_split(text) -> str | tuple[int, ...]:
    """`parallel.layer_split` -> "even" | "balanced" | a tuple of counts (syntax only: the
    model's checks are layer_counts'). A tuple or list of ints passes through."""
    if isinstance(text, (tuple, list)) and all(isinstance(n, int) and not isinstance(n, bool)
                                               for n in text):
        counts = tuple(text)
    elif isinstance(text, str) and text.strip() in WORDS:
        return text.strip()
    else:
        try:
            counts = tuple(int(part) for part in str(text).split(","))
        except ValueError:
            counts = ()
    if not counts:
        raise ValueError(f"parallel.layer_split={text!r} must be 'even', 'balanced' or "
                         "comma-separated layer counts per virtual stage such as '5,3'")
    if min(counts) < 1:
        raise ValueError(f"parallel.layer_split={text!r}: every virtual stage needs at "
                         "least one layer")
    return counts


def layer_counts(num_layers: int, n_virtual: int, split="even") -> tuple[int, ...]:
    """The layers of each virtual stage for "even" or explicit counts, checked against the
    model. "balanced" has to be resolved into counts first (engine/train/layer_split.py)."""
    split = parse_layer_split(split)
    if split == "balanced":
        raise ValueError("parallel.layer_split='balanced' must be resolved into counts "
                         "first (engine.train.layer_split.resolve_layer_split)")
    if split == "even":
        if num_layers % n_virtual:
            raise ValueError(f"num_layers={num_layers} is not divisible by pipeline stages "
                             f"pp*vpp={n_virtual} (parallel.layer_split 'balanced' or "
                             "explicit counts allow an uneven split)")
        return (num_layers // n_virtual,) * n_virtual
    text = ",".join(map(str, split))
    if len(split) != n_virtual:
        raise ValueError(f"parallel.layer_split={text!r} has {len(split)} entries; the "
                         f"layout has pp*vpp={n_virtual} virtual stages")
    if sum(split) != num_layers:
        raise ValueError(f"parallel.layer_split={text!r} sums to {sum(split)} layers; the "
                         f"model has num_layers={num_layers}")
    return split


def check_layer_split(num_layers: int, n_virtual: int, split="even"):
    """The model's checks of any split; "balanced" needs one layer per virtual stage."""
    if parse_layer_split(split) != "balanced":
        layer_counts(num_layers, n_virtual, split)
    elif num_layers < n_virtual:
        raise ValueError(f"parallel.layer_split='balanced': num_layers={num_layers} is "
                         f"fewer than the pipeline's pp*vpp={n_virtual} virtual stages")


def layer_ranges(num_layers: int, n_virtual: int, split="even") -> list[tuple[int, int]]:
    """[start, end) of the layers of each virtual stage, virtual stage 0 first."""
    out, start = [], 0
    for n in layer_counts(num_layers, n_virtual, split):
        out.append((start, start + n))
        start += n
    return out


def format_split(counts) -> str:
    """Counts as `parallel.layer_split` spells them ("5,3")."""
    return ",".join(map(str, counts))
