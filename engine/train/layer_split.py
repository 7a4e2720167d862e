"""parallel.layer_split resolved into layers per virtual stage, and the "balanced" split.

Why: with equal virtual stages the stage that also holds the final norm, the output head
and the loss does more work than the others, and every other stage waits for it each
microbatch (the pipeline runs at its slowest stage's pace). "balanced" moves layers off
the head's stage: it picks the contiguous counts that minimise the most expensive
PHYSICAL stage (a rank's chunks summed), where a virtual stage costs

    layers x layer FLOPs  +  head FLOPs (the virtual stage with the head)
                          +  0 (the embedding: a lookup, no FLOPs in this convention)

from the FLOP counts the planner uses (engine/train/flops.py: 6 per weight per token
plus attention). The loss's softmax is elementwise and not counted, so where it is
bandwidth-bound (the CPU) the head costs more than this says; give explicit counts then.

Layer costs are all equal, so a rank's cost depends only on how many layers it holds:
the search first gives each rank its total, then splits each rank's total over its
chunks the same way (the chunk with the head gets fewer). Each level is the exact
min-max allocation, then the most even one among the optima (fewest squared layers),
remaining ties giving the extra layer to the later stage (earlier stages of the 1F1B
family hold more microbatches' activations in flight). Integer FLOPs, so every rank
computes the same split.
"""
from __future__ import annotations

from engine.parallel.split import check_layer_split, layer_counts, parse_layer_split
from engine.pipeline.placement import Placement, placement_for
from engine.train.flops import head_flops_per_token, layer_flops_per_token


def allocate(total: int, extras: list[int], layer_cost: int, minimum: int) -> list[int]:
    """Counts n_i >= minimum summing to `total` that minimise max_i(layer_cost * n_i +
    extras[i]); among those the most even, ties to the later bucket."""
    k = len(extras)
    if total < k * minimum:
        raise ValueError(f"{total} layers cannot give {k} stages {minimum} each")
    if layer_cost <= 0:
        raise ValueError(f"layer cost {layer_cost} must be positive")

    def caps(limit: int) -> list[int]:
        return [min(total, (limit - e) // layer_cost) for e in extras]

    def fits(limit: int) -> bool:
        c = caps(limit)
        return min(c) >= minimum and sum(c) >= total

    # the optimum is one bucket's cost: binary search over those values
    values = sorted({layer_cost * n + e for e in extras for n in range(minimum, total + 1)})
    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(values[mid]) else (mid + 1, hi)
    cap = caps(values[lo])
    counts = [minimum] * k
    for _ in range(total - k * minimum):
        # the emptiest bucket with room (sum of squares is convex: greedy is exact)
        i = min((j for j in range(k) if counts[j] < cap[j]), key=lambda j: (counts[j], -j))
        counts[i] += 1
    return counts


def balanced_counts(num_layers: int, place: Placement, layer_cost: int, head_cost: int,
                    embed_cost: int = 0) -> tuple[int, ...]:
    """Layers of each virtual stage (virtual stage 0 first) for the placement `place`,
    minimising the most expensive rank (see the module docstring)."""
    p, v = place.p, place.v
    extra = [0] * (p * v)
    for s in range(p):
        for c in range(v):
            extra[place.virtual(s, c)] = (embed_cost * place.first(s, c)
                                          + head_cost * place.last(s, c))
    mine = [sorted(place.virtual(s, c) for c in range(v)) for s in range(p)]
    totals = allocate(num_layers, [sum(extra[k] for k in ks) for ks in mine], layer_cost, v)
    counts = [0] * (p * v)
    for ks, total in zip(mine, totals):
        for k, n in zip(ks, allocate(total, [extra[k] for k in ks], layer_cost, 1)):
            counts[k] = n
    return tuple(counts)


def resolve_layer_split(config, seq_len: int, pp: int, vpp: int, schedule: str | None,
                        split="even") -> tuple[int, ...]:
    """parallel.layer_split as checked counts per virtual stage for this model (GLMConfig),
    train.seq_len and layout; "balanced" by the FLOP counts above."""
    split = parse_layer_split(split)
    if split == "balanced" and pp * vpp == 1:
        split = (config.num_layers,)      # one stage (whatever the schedule is named)
    if split == "balanced":
        check_layer_split(config.num_layers, pp * vpp, split)
        split = balanced_counts(config.num_layers, placement_for(schedule, pp, vpp),
                                round(layer_flops_per_token(config, seq_len)),
                                round(head_flops_per_token(config)))
    return layer_counts(config.num_layers, pp * vpp, split)
