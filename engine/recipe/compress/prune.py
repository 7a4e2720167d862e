"""Structured pruning on the tensors: a full GLM state dict + a Selection of what to keep
-> a smaller, ordinary GLMConfig and state dict (paper Fig. 2: heads, head dim, FFN
width, hidden width, depth).

    target = PruneTarget(kv_channels=16, ffn_hidden_size=344)
    sel = select(importance, config, target)          # what to keep, by importance
    small_cfg, small_state = prune_state_dict(state, config, sel)

What is sliced, per kept layer (engine/recipe/compress/structure.py has the layouts):
  heads      q rows of the kept heads; K/V rows of the kept groups; dense columns of the
             kept heads. GQA groups stay whole: each kept group keeps the same number of
             its own query heads, listed group by group, so new head j reads new group
             j // (nq' / ng') exactly as its original head read its original group.
  head dim   q and k rows keep whole rotary pairs, the same pairs in both halves (see
             "rotary" below); V rows keep their own channels (V is not rotated, so any d'
             channels per group will do) and the dense columns follow them. The model
             divides scores by sqrt(d), so the kept q rows are scaled by sqrt(d'/d) to
             keep every attention logit.
  ffn        gate and up rows of a neuron together, and its down column.
  hidden     the embedding and output-head columns, every norm weight, qkv and gate_up
             columns, dense and down rows (and biases). RMSNorm averages over h: with
             h' channels it divides by h' instead of h, so norm weights are scaled by
             sqrt(h/h') and layernorm_epsilon by h/h'. Then
             w' x' / sqrt(|x'|^2/h' + eps h/h') = w x' / sqrt(|x'|^2/h + eps), i.e. removing
             channels that are zero in the residual stream is exact, and removing small
             ones perturbs the statistics as little as possible.
  depth      dropped layers vanish and the rest are renumbered 0..L'-1 in order.

Rotary, the exact rule ("exact", the default). Pair slot j of a head with d channels
rotates at frequency base^(-4j/d) in each half. A pruned head keeps m = d'/4 pairs per
half and its slot j rotates at base'^(-4j/d'). Old pair i matches slot j for every
position only if base^(-4i/d) = base'^(-4j/d'), i.e. the kept pairs must be
{0, s, 2s, ..., (m-1)s} for an integer stride s and base' = base^(s d'/d) (rope_ratio is
set accordingly). The stride with the largest summed qk-pair importance is chosen; the
same pairs are kept in both halves (they share frequencies) and in every head. Under this
rule pruning is exact whenever the dropped pairs contribute nothing.
"free" keeps each group's top pairs per half instead; their frequencies then change (slot
j takes the new base's j-th frequency), an approximation distillation has to repair.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from engine.recipe.compress.structure import layer_prefix, pair_channels
from model.config import GLMConfig

ROTARY_RULES = ("exact", "free")


@dataclass
class PruneTarget:
    """The student's shape. None keeps the teacher's value."""
    num_layers: int | None = None
    num_attention_heads: int | None = None
    multi_query_group_num: int | None = None
    kv_channels: int | None = None
    ffn_hidden_size: int | None = None
    hidden_size: int | None = None

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive integer")

    def resolve(self, config: GLMConfig) -> "PruneTarget":
        """Fill None from the teacher and check the target fits inside it."""
        t = PruneTarget(**{k: (v if v is not None else getattr(config, k))
                           for k, v in asdict(self).items()})
        for name, value in asdict(t).items():
            if value > getattr(config, name):
                raise ValueError(f"{name}={value} exceeds the teacher's {getattr(config, name)}")
        if t.num_attention_heads % t.multi_query_group_num:
            raise ValueError(f"num_attention_heads={t.num_attention_heads} is not divisible by "
                             f"multi_query_group_num={t.multi_query_group_num}")
        rep = config.num_attention_heads // config.multi_query_group_num
        if t.num_attention_heads // t.multi_query_group_num > rep:
            raise ValueError(f"num_attention_heads={t.num_attention_heads} over "
                             f"multi_query_group_num={t.multi_query_group_num} groups needs "
                             f"{t.num_attention_heads // t.multi_query_group_num} heads per "
                             f"group; the teacher's groups hold {rep}")
        if t.kv_channels % 4:
            raise ValueError(f"kv_channels={t.kv_channels} must be divisible by 4 (whole "
                             "rotary pairs, equal halves)")
        return t


@dataclass
class LayerSelection:
    """What one kept layer keeps, as original indices in ascending order."""
    groups: list[int]
    heads: list[int]               # group by group; len = ng' * rep'
    qk_channels: list[list[int]]   # per kept group: channels of q and k (whole pairs)
    v_channels: list[list[int]]    # per kept group: channels of v
    ffn: list[int]


@dataclass
class Selection:
    layers: list[int]                                  # kept original layer indices
    per_layer: dict[int, LayerSelection] = field(default_factory=dict)
    hidden: list[int] = field(default_factory=list)
    rope_ratio: float = 1.0                            # what the pruned model needs

    def to_dict(self) -> dict:
        return {"layers": self.layers, "hidden": self.hidden, "rope_ratio": self.rope_ratio,
                "per_layer": {str(k): asdict(v) for k, v in self.per_layer.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Selection":
        return cls(layers=list(d["layers"]), hidden=list(d["hidden"]),
                   rope_ratio=float(d["rope_ratio"]),
                   per_layer={int(k): LayerSelection(**v) for k, v in d["per_layer"].items()})


def full_selection(config: GLMConfig) -> Selection:
    """Keep everything (start here to hand-build a selection)."""
    c = config
    ng, d = c.multi_query_group_num, c.kv_channels
    layer = LayerSelection(groups=list(range(ng)), heads=list(range(c.num_attention_heads)),
                           qk_channels=[list(range(d)) for _ in range(ng)],
                           v_channels=[list(range(d)) for _ in range(ng)],
                           ffn=list(range(c.ffn_hidden_size)))
    return Selection(layers=list(range(c.num_layers)),
                     per_layer={i: LayerSelection(**asdict(layer)) for i in range(c.num_layers)},
                     hidden=list(range(c.hidden_size)), rope_ratio=c.rope_ratio)


def exact_rope_ratio(config: GLMConfig, new_head_dim: int, stride: int) -> float:
    """rope_ratio with base' = base^(stride * d'/d): slot j then rotates like old pair j*s.
    It scales the base, so the student's rope_scaling is "base" (pruned_config)."""
    if config.rope_scaling == "position":
        # base' would have to change while positions stay divided: not one rope_ratio
        raise ValueError("head-dim pruning with rotary='exact' needs a base-scaled rope; this "
                         "model divides positions by rope_ratio (rope_scaling='position'): "
                         "keep the head dim or use --prune.rotary free")
    return config.rope_base ** (stride * new_head_dim / config.kv_channels) / 10000.0


def rotary_strides(head_dim: int, new_head_dim: int) -> list[int]:
    """Strides s with {0, s, ..., (m-1)s} inside a half of d/4 pairs (m = d'/4)."""
    m, half = new_head_dim // 4, head_dim // 4
    if m == 1:
        return [1]
    return [s for s in range(1, half) if (m - 1) * s <= half - 1]


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, ascending; ties go to the lower index."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def select(importance, config: GLMConfig, target: PruneTarget, rotary: str = "exact") -> Selection:
    """Keep the highest-scoring structures at the target shape."""
    if rotary not in ROTARY_RULES:
        raise ValueError(f"rotary={rotary!r} must be one of {', '.join(ROTARY_RULES)}")
    importance.check(config)
    t = target.resolve(config)
    c = config
    d, d2 = c.kv_channels, t.kv_channels
    ng2 = t.multi_query_group_num
    rep, rep2 = c.num_attention_heads // c.multi_query_group_num, t.num_attention_heads // ng2
    half, m = d // 4, d2 // 4
    layers = _top(importance.layers, t.num_layers)

    rope_ratio, exact_pairs = c.rope_ratio, None
    if rotary == "exact":
        # one stride for the whole model: rope_ratio is a single number
        qk_total = importance.qk_pairs[layers].sum((0, 1))          # [d/2]
        both = qk_total[:half] + qk_total[half:]                     # pair p of either half
        stride = max(rotary_strides(d, d2),
                     key=lambda s: (float(both[[j * s for j in range(m)]].sum()), -s))
        exact_pairs = [j * stride for j in range(m)]
        if d2 != d:
            rope_ratio = exact_rope_ratio(c, d2, stride)

    per_layer = {}
    for i in layers:
        groups = _top(importance.groups[i], ng2)
        heads, qk, vc = [], [], []
        for g in groups:
            own = torch.arange(g * rep, (g + 1) * rep)
            heads += [int(own[j]) for j in _top(importance.heads[i, own], rep2)]
            if exact_pairs is not None:
                pairs = exact_pairs + [p + half for p in exact_pairs]
            else:
                pq = importance.qk_pairs[i, g]
                pairs = _top(pq[:half], m) + [p + half for p in _top(pq[half:], m)]
            qk.append(pair_channels(pairs))
            vc.append(_top(importance.v_channels[i, g], d2))
        per_layer[i] = LayerSelection(groups=groups, heads=heads, qk_channels=qk, v_channels=vc,
                                      ffn=_top(importance.ffn[i], t.ffn_hidden_size))
    return Selection(layers=layers, per_layer=per_layer,
                     hidden=_top(importance.hidden, t.hidden_size), rope_ratio=rope_ratio)


def pruned_config(config: GLMConfig, sel: Selection) -> GLMConfig:
    first = sel.per_layer[sel.layers[0]]
    h2 = len(sel.hidden)
    return GLMConfig.from_dict({
        **config.to_dict(), "num_layers": len(sel.layers),
        "num_attention_heads": len(first.heads), "multi_query_group_num": len(first.groups),
        "kv_channels": len(first.v_channels[0]), "ffn_hidden_size": len(first.ffn),
        "hidden_size": h2, "rope_ratio": sel.rope_ratio,
        # a changed ratio is exact_rope_ratio's, which scales the base
        "rope_scaling": (config.rope_scaling if sel.rope_ratio == config.rope_ratio
                         else "base"),
        "layernorm_epsilon": config.layernorm_epsilon * config.hidden_size / h2})


def _check(sel: Selection, config: GLMConfig):
    """A selection must describe one uniform, valid shape inside `config`."""
    c = config
    if not sel.layers or sorted(set(sel.layers)) != sel.layers or sel.layers[-1] >= c.num_layers:
        raise ValueError(f"selection.layers={sel.layers} must be ascending, distinct, "
                         f"inside 0..{c.num_layers - 1}")
    if sorted(set(sel.hidden)) != sel.hidden or not sel.hidden or sel.hidden[-1] >= c.hidden_size:
        raise ValueError("selection.hidden must be ascending distinct channels inside "
                         f"0..{c.hidden_size - 1}")
    rep = c.num_attention_heads // c.multi_query_group_num
    shape = None
    for i in sel.layers:
        if i not in sel.per_layer:
            raise ValueError(f"selection has no entry for kept layer {i}")
        ls = sel.per_layer[i]
        ng2 = len(ls.groups)
        if not ng2 or len(ls.heads) % ng2:
            raise ValueError(f"layer {i}: {len(ls.heads)} heads over {ng2} groups")
        rep2 = len(ls.heads) // ng2
        for n, g in enumerate(ls.groups):
            mine = ls.heads[n * rep2:(n + 1) * rep2]
            if any(h // rep != g for h in mine):
                raise ValueError(f"layer {i}: heads {mine} are listed under KV group {g} but "
                                 "do not all read it (GQA groups must stay whole)")
        d2 = len(ls.v_channels[0]) if ls.v_channels else 0
        if len(ls.qk_channels) != ng2 or len(ls.v_channels) != ng2:
            raise ValueError(f"layer {i}: need one qk and one v channel list per kept group")
        for ch in ls.qk_channels:
            pairs = {x // 2 for x in ch}
            if len(ch) != d2 or ch != pair_channels(pairs):
                raise ValueError(f"layer {i}: qk channels {ch} must be {d2} channels forming "
                                 "whole rotary pairs")
            if sum(p < c.kv_channels // 4 for p in pairs) != d2 // 4:
                raise ValueError(f"layer {i}: qk channels {ch} must keep d'/4 pairs in each "
                                 "half of the head")
        if any(len(v) != d2 for v in ls.v_channels) or d2 % 4 or d2 > c.kv_channels:
            raise ValueError(f"layer {i}: every group must keep the same d' (divisible by 4)")
        now = (ng2, rep2, d2, len(ls.ffn))
        if shape is not None and now != shape:
            raise ValueError(f"layer {i}: shape {now} differs from the other kept layers {shape}")
        shape = now


def prune_state_dict(state: dict, config: GLMConfig, sel: Selection) -> tuple[GLMConfig, dict]:
    """Slice a full, single-model state dict. Returns (pruned config, pruned state)."""
    _check(sel, config)
    c = config
    new_cfg = pruned_config(c, sel)
    d, d2, h, h2 = c.kv_channels, new_cfg.kv_channels, c.hidden_size, new_cfg.hidden_size
    hid = torch.tensor(sel.hidden)
    norm_scale = math.sqrt(h / h2)
    q_scale = math.sqrt(d2 / d)
    out = {}
    if "embedding.weight" in state:
        out["embedding.weight"] = state["embedding.weight"][:, hid]
    if "output_layer.weight" in state:
        out["output_layer.weight"] = state["output_layer.weight"][:, hid]
    if "final_norm.weight" in state:
        out["final_norm.weight"] = state["final_norm.weight"][hid] * norm_scale
    for new_i, i in enumerate(sel.layers):
        ls, p, p2 = sel.per_layer[i], layer_prefix(i), layer_prefix(new_i)
        rep2 = len(ls.heads) // len(ls.groups)
        for name in ("input_norm.weight", "post_attention_norm.weight"):
            out[p2 + name] = state[p + name][hid] * norm_scale
        # qkv rows: [kept heads x their group's qk channels | kept groups' K | kept groups' V]
        q_rows, k_rows, v_rows = [], [], []
        for n, g in enumerate(ls.groups):
            qk = torch.tensor(ls.qk_channels[n])
            for hq in ls.heads[n * rep2:(n + 1) * rep2]:
                q_rows.append(hq * d + qk)
            k_rows.append(c.q_size + g * d + qk)
            v_rows.append(c.q_size + c.kv_size + g * d + torch.tensor(ls.v_channels[n]))
        rows = torch.cat(q_rows + k_rows + v_rows)
        n_q = len(ls.heads) * d2
        for kind in ("weight", "bias"):
            name = p + "attention.qkv." + kind
            if name not in state:
                continue
            t = state[name][rows]
            t = t[:, hid] if kind == "weight" else t
            t = t.clone()
            t[:n_q] *= q_scale  # scores are divided by sqrt(d'): keep q.k / sqrt(d)
            out[p2 + "attention.qkv." + kind] = t
        # dense columns follow each kept head's group's V channels
        cols = torch.cat([hq * d + torch.tensor(ls.v_channels[n])
                          for n in range(len(ls.groups))
                          for hq in ls.heads[n * rep2:(n + 1) * rep2]])
        out[p2 + "attention.dense.weight"] = state[p + "attention.dense.weight"][hid][:, cols]
        if p + "attention.dense.bias" in state:
            out[p2 + "attention.dense.bias"] = state[p + "attention.dense.bias"][hid]
        ffn = torch.tensor(ls.ffn)
        gu_rows = torch.cat([ffn, c.ffn_hidden_size + ffn])
        out[p2 + "mlp.gate_up.weight"] = state[p + "mlp.gate_up.weight"][gu_rows][:, hid]
        if p + "mlp.gate_up.bias" in state:
            out[p2 + "mlp.gate_up.bias"] = state[p + "mlp.gate_up.bias"][gu_rows]
        out[p2 + "mlp.down.weight"] = state[p + "mlp.down.weight"][hid][:, ffn]
        if p + "mlp.down.bias" in state:
            out[p2 + "mlp.down.bias"] = state[p + "mlp.down.bias"][hid]
    return new_cfg, {k: v.contiguous() for k, v in out.items()}


def build_from_state(config: GLMConfig, state: dict, device="cpu"):
    """A GLM holding exactly `state` (no throwaway init)."""
    from model import GLM
    with torch.device("meta"):
        model = GLM(config)
    model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    return model


def prune_model(model, sel: Selection):
    """In-memory convenience: a pruned copy of a whole GLM."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    cfg, new_state = prune_state_dict(state, model.config, sel)
    return build_from_state(cfg, new_state, next(model.parameters()).device)
