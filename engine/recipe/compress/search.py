"""Choosing the student's shape: the paper's rule, or a parameter budget.

Budgets count non-embedding parameters (GLM.num_params(exclude_embeddings=True): every
block, the final norm; not the embedding or the output head), as Minitron and the issue
do.

The paper's rule (Fig. 2): keep the heads, shrink the head dim d -> d', scale the FFN by
d'/d. `paper_target(config, keep=0.5)` picks the d' whose student is closest to the
budget.

`search_target` is a width-first greedy search (Minitron prunes width before depth, and
depth only when asked: `axes` includes "layers"). From the teacher's shape it repeatedly
takes the one step, on one axis, that raises the calibration loss least per parameter it
removes, until the budget is met:

    ffn     -f/16 neurons        heads   -1 query head per KV group
    head_dim -4 (one rotary pair per half)   groups  -1 KV group
    hidden  -h/16 channels       layers  -1 layer

Each candidate is the teacher pruned to that shape by `select` (the structures kept are
always the most important ones), evaluated zero-shot with `loss_fn(config, state)`. Costs
a few dozen forward passes over the calibration batches.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from engine.recipe.compress.prune import PruneTarget, build_from_state, prune_state_dict, select
from engine.recipe.evaluate import mean_token_loss
from model import GLMConfig

AXES = ("ffn", "head_dim", "heads", "groups", "hidden", "layers")
WIDTH_AXES = ("ffn", "head_dim", "heads", "groups", "hidden")


def non_embedding_params(config: GLMConfig) -> int:
    """GLM(config).num_params(exclude_embeddings=True), counted without building it (the
    search calls this for every candidate)."""
    c = config
    h, f, qkv = c.hidden_size, c.ffn_hidden_size, c.qkv_size
    per_layer = (2 * h + h * qkv + (qkv if c.add_qkv_bias else 0) + c.q_size * h
                 + 3 * h * f + ((h + 2 * f + h) if c.add_bias_linear else 0))
    return c.num_layers * per_layer + h  # + the final norm


@torch.no_grad()
def calibration_loss(config: GLMConfig, state: dict, batches) -> float:
    """Mean token loss of the GLM (config, state) over collated batches: the search's
    zero-shot score of a candidate."""
    return mean_token_loss(build_from_state(config, state), batches)


def target_config(config: GLMConfig, target: PruneTarget) -> GLMConfig:
    """The student's config for a target (sizes only; prune_state_dict also sets
    rope_ratio and layernorm_epsilon)."""
    t = target.resolve(config)
    return GLMConfig.from_dict({**config.to_dict(), **asdict(t)})


def paper_target(config: GLMConfig, head_dim: int | None = None, keep: float | None = None,
                 fixed: PruneTarget | None = None) -> PruneTarget:
    """Keep the heads, head dim -> head_dim (or the one closest to `keep`), FFN * d'/d.
    `fixed` carries other sizes chosen up front (e.g. a depth), counted in the budget."""
    if (head_dim is None) == (keep is None):
        raise ValueError("paper rule: give exactly one of head_dim and keep")
    d, f = config.kv_channels, config.ffn_hidden_size
    base = asdict(fixed) if fixed is not None else {}

    def rule(d2):
        return PruneTarget(**{**base, "kv_channels": d2,
                              "ffn_hidden_size": max(1, round(f * d2 / d))})

    if head_dim is not None:
        return rule(head_dim)
    if not 0 < keep <= 1:
        raise ValueError(f"keep={keep} must be in (0, 1]")
    goal = keep * non_embedding_params(config)
    return min((rule(d2) for d2 in range(4, d + 1, 4)),
               key=lambda t: abs(non_embedding_params(target_config(config, t)) - goal))


def _step(t: PruneTarget, axis: str, teacher: GLMConfig) -> PruneTarget | None:
    """One step smaller along `axis`, or None when the axis is exhausted."""
    t = PruneTarget(**asdict(t))
    if axis == "ffn":
        step = max(1, round(teacher.ffn_hidden_size / 16))
        if t.ffn_hidden_size - step < 1:
            return None
        t.ffn_hidden_size -= step
    elif axis == "head_dim":
        if t.kv_channels - 4 < 4:
            return None
        t.kv_channels -= 4
    elif axis == "heads":
        rep = t.num_attention_heads // t.multi_query_group_num
        if rep == 1:
            return None
        t.num_attention_heads -= t.multi_query_group_num
    elif axis == "groups":
        rep = t.num_attention_heads // t.multi_query_group_num
        if t.multi_query_group_num == 1:
            return None
        t.multi_query_group_num -= 1
        t.num_attention_heads = rep * t.multi_query_group_num
    elif axis == "hidden":
        step = max(1, round(teacher.hidden_size / 16))
        if t.hidden_size - step < 1:
            return None
        t.hidden_size -= step
    elif axis == "layers":
        if t.num_layers == 1:
            return None
        t.num_layers -= 1
    return t


@dataclass
class SearchStep:
    axis: str
    target: dict
    params: int
    loss: float


def search_target(config: GLMConfig, state: dict, importance, keep: float, loss_fn, *,
                  axes=WIDTH_AXES, rotary: str = "exact", start: PruneTarget | None = None,
                  log=None) -> tuple[PruneTarget, list[SearchStep]]:
    """Greedy, loss-guided shape search under a non-embedding parameter budget.
    `start` fixes some axes up front (e.g. a depth the user asked for)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep={keep} must be in (0, 1]")
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise ValueError(f"unknown search axis {bad[0]!r}; known: {', '.join(AXES)}")
    budget = keep * non_embedding_params(config)
    current = (start or PruneTarget()).resolve(config)

    def evaluate(t: PruneTarget):
        sel = select(importance, config, t, rotary=rotary)
        cfg, st = prune_state_dict(state, config, sel)
        return non_embedding_params(cfg), float(loss_fn(cfg, st))

    params, loss = evaluate(current)
    trace = [SearchStep("start", asdict(current), params, loss)]
    while params > budget:
        best = None
        for axis in axes:
            cand = _step(current, axis, config)
            if cand is None:
                continue
            p, l_ = evaluate(cand)
            saved = params - p
            if saved <= 0:
                continue
            cost = (l_ - loss) / saved
            if best is None or cost < best[0]:
                best = (cost, axis, cand, p, l_)
        if best is None:
            raise ValueError(f"keep={keep}: cannot reach {budget:,.0f} non-embedding "
                             f"parameters along axes {', '.join(axes)}")
        _, axis, current, params, loss = best
        trace.append(SearchStep(axis, asdict(current), params, loss))
        if log:
            log(f"search: -{axis:8s} -> {params:,} params, calibration loss {loss:.4f}")
    return current, trace
