"""Importance of every prunable structure of a GLM, from calibration batches.

    imp = compute_importance("activation", model, batches, pad_id=0)
    imp.heads[layer]           # [nq]   one score per query head, higher = keep

Methods (the paper's Fig. 4 compares the mixed compression against "random"):
  activation  forward-only, Minitron style, through forward hooks (the model is not
              edited): a head's score is the mean L2 norm of its context vector (the
              input of attention.dense split per head); a V channel's the mean |context|
              of that channel summed over the group's heads; a qk pair's the product of
              the mean pair norms of the query and key (|q_p . k_p| <= |q_p| |k_p|, and
              rotary keeps pair norms, so this bounds the pair's share of every attention
              logit); an FFN neuron's the mean |silu(gate) * up| (the input of mlp.down);
              a hidden channel's the mean |output| of every RMSNorm summed over the norms;
              a layer's the block influence 1 - cos(input, output) averaged over tokens
              (or, with layer_metric="loss", layer_drop_importance below).
  taylor      first order: |w * dL/dw| per element, summed over every element the
              structure owns (engine/recipe/compress/structure.py), accumulated over batches.
  magnitude   the L2 norm of all the weights a structure owns.
  random      uniform scores from a seeded generator (the baseline).

Scores are averaged over real tokens only (input_id != pad_id): padding would otherwise
weigh in with whatever the model does on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.recipe.compress.structure import reduce_to_structures
from model import GLM, GLMConfig

METHODS = ("activation", "taylor", "magnitude", "random")


@dataclass
class Importance:
    method: str
    layers: torch.Tensor       # [L]
    heads: torch.Tensor        # [L, nq]
    groups: torch.Tensor       # [L, ng]
    qk_pairs: torch.Tensor     # [L, ng, d/2]; pairs < d/4 are the position half
    v_channels: torch.Tensor   # [L, ng, d]
    ffn: torch.Tensor          # [L, f]
    hidden: torch.Tensor       # [h]

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} must be one of {', '.join(METHODS)}")

    def check(self, config: GLMConfig):
        c = config
        want = {"layers": (c.num_layers,), "heads": (c.num_layers, c.num_attention_heads),
                "groups": (c.num_layers, c.multi_query_group_num),
                "qk_pairs": (c.num_layers, c.multi_query_group_num, c.kv_channels // 2),
                "v_channels": (c.num_layers, c.multi_query_group_num, c.kv_channels),
                "ffn": (c.num_layers, c.ffn_hidden_size), "hidden": (c.hidden_size,)}
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"importance.{name} has shape {got}, the config needs {shape}")


def _full_model(model: GLM):
    if not (model.pre_process and model.post_process
            and model.layer_range == (0, model.config.num_layers)):
        raise ValueError("importance needs the whole model (every layer, embedding and head); "
                         f"got layer_range={model.layer_range}")


def _forward(model: GLM, batch: dict, labels: bool):
    device = next(model.parameters()).device
    kw = {k: batch[k].to(device) for k in ("position_ids", "block_position_ids", "prefix_lens",
                                             "doc_starts") if k in batch}
    if labels:
        kw["labels"] = batch["labels"].to(device)
    return model(batch["input_ids"].to(device), **kw)


# ---- activation -------------------------------------------------------------------------
class _ActivationStats:
    """Forward hooks that sum per-token statistics over the real tokens of each batch.
    `mask` [s, b, 1] (1.0 on real tokens) is set before every forward."""

    def __init__(self, model: GLM):
        c = model.config
        L, nq, ng, d, f, h = (c.num_layers, c.num_attention_heads, c.multi_query_group_num,
                              c.kv_channels, c.ffn_hidden_size, c.hidden_size)
        self.c = c
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64)  # noqa: E731
        self.head_norm, self.ctx_abs = z(L, nq), z(L, nq, d)
        self.q_pair, self.k_pair = z(L, nq, d // 2), z(L, ng, d // 2)
        self.ffn, self.hidden, self.influence = z(L, f), z(h), z(L)
        self.tokens = 0.0
        self.mask = None
        self.handles = []
        for key, layer in model.layers.items():
            i = int(key)
            att = layer.attention
            self.handles += [
                att.dense.register_forward_pre_hook(self._on_context(i)),
                att.qkv.register_forward_hook(self._on_qkv(i)),
                layer.mlp.down.register_forward_pre_hook(self._on_ffn(i)),
                layer.input_norm.register_forward_hook(self._on_norm),
                # the post-attention norm runs fused inside the block (ops.add_rms_norm), so
                # its output is read where it arrives: the MLP's input
                layer.mlp.register_forward_pre_hook(lambda m, a: self._on_norm(m, a, a[0])),
                layer.register_forward_hook(self._on_block(i)),
            ]
        self.handles.append(model.final_norm.register_forward_hook(self._on_norm))

    def remove(self):
        for hd in self.handles:
            hd.remove()

    def _masked_sum(self, x):
        # x [s, b, ...] -> sum over real tokens, fp64 (long runs of small values)
        m = self.mask.view(self.mask.shape[:2] + (1,) * (x.ndim - 2))
        return (x.double() * m).sum((0, 1))

    def _on_context(self, i):
        def hook(module, args):
            ctx = args[0].detach()                            # [s, b, nq*d]
            s, b, _ = ctx.shape
            ctx = ctx.view(s, b, self.c.num_attention_heads, self.c.kv_channels)
            self.head_norm[i] += self._masked_sum(ctx.float().norm(dim=-1))
            self.ctx_abs[i] += self._masked_sum(ctx.abs())
        return hook

    def _on_qkv(self, i):
        def hook(module, args, out):
            c = self.c
            q, k, _ = out.detach().split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            s, b, _ = q.shape
            pair_norm = lambda t, n: t.float().view(s, b, n, -1, 2).norm(dim=-1)  # noqa: E731
            self.q_pair[i] += self._masked_sum(pair_norm(q, c.num_attention_heads))
            self.k_pair[i] += self._masked_sum(pair_norm(k, c.multi_query_group_num))
        return hook

    def _on_ffn(self, i):
        def hook(module, args):
            self.ffn[i] += self._masked_sum(args[0].detach().abs())
        return hook

    def _on_norm(self, module, args, out):
        self.hidden += self._masked_sum(out.detach().abs())

    def _on_block(self, i):
        def hook(module, args, out):
            x, y = args[0].detach().float(), out.detach().float()  # [s, b, h]
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
            self.influence[i] += self._masked_sum(1.0 - cos)
        return hook

    def result(self) -> Importance:
        c, n = self.c, max(self.tokens, 1.0)
        ng, rep = c.multi_query_group_num, c.num_attention_heads // c.multi_query_group_num
        L, d = c.num_layers, c.kv_channels
        heads = self.head_norm / n
        q_pair, k_pair = self.q_pair / n, self.k_pair / n
        qk = (q_pair.view(L, ng, rep, d // 2) * k_pair.unsqueeze(2)).sum(2)
        return Importance("activation", layers=self.influence / n, heads=heads,
                          groups=heads.view(L, ng, rep).sum(-1), qk_pairs=qk,
                          v_channels=(self.ctx_abs / n).view(L, ng, rep, d).sum(2),
                          ffn=self.ffn / n, hidden=self.hidden / n)


@torch.no_grad()
def activation_importance(model: GLM, batches, pad_id: int | None = 0) -> Importance:
    _full_model(model)
    was_training = model.training
    model.eval()
    stats = _ActivationStats(model)
    try:
        for batch in batches:
            ids = batch["input_ids"]
            real = (ids != pad_id) if pad_id is not None else torch.ones_like(ids, dtype=torch.bool)
            stats.mask = real.t().to(torch.float64).to(next(model.parameters()).device)
            stats.tokens += float(real.sum())
            _forward(model, batch, labels=False)
    finally:
        stats.remove()
        model.train(was_training)
    return stats.result()


# ---- layers by their effect on the loss ---------------------------------------------------
def _mean_loss(model: GLM, batches) -> float:
    total, count = 0.0, 0
    for batch in batches:
        total += _forward(model, batch, labels=True).sum().item()
        count += int((batch["labels"] != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def layer_drop_importance(model: GLM, batches) -> torch.Tensor:
    """[L] Depth importance from the loss (Minitron's perplexity metric, made greedy):
    skip the layer whose removal raises the calibration loss least, then repeat with it
    gone, until one layer is left. A layer's score is its place in that order (0 = the
    first to go, L-1 = the last one standing), so `select` keeping the top L' scores
    keeps exactly the greedy choice for every L'. Layers are skipped by a forward hook
    that hands the block's input on as its output (the model is not edited).

    Why greedy: layers compensate for each other, so scoring each drop alone misses
    which *sets* work (here the last layer scores low alone, yet no good 4-layer set
    drops it). Cost: L(L-1)/2 passes over the calibration batches. Block influence sees
    only how much a layer turns the residual stream, not what that does to the loss."""
    _full_model(model)
    was_training = model.training
    model.eval()
    L = model.config.num_layers
    scores = torch.full((L,), float(L - 1), dtype=torch.float64)
    dropped: list[int] = []

    def loss_without(layers):
        handles = [model.layers[str(i)].register_forward_hook(lambda m, args, out: args[0])
                   for i in layers]
        try:
            return _mean_loss(model, batches)
        finally:
            for h in handles:
                h.remove()

    try:
        for rank in range(L - 1):
            left = [i for i in range(L) if i not in dropped]
            best = min(left, key=lambda i: (loss_without(dropped + [i]), i))
            dropped.append(best)
            scores[best] = rank
    finally:
        model.train(was_training)
    return scores


# ---- weight based -----------------------------------------------------------------------
def _from_elements(method: str, elements: dict, config: GLMConfig, sqrt: bool = False):
    red = reduce_to_structures(elements, config)
    if sqrt:
        red = {k: v.clamp_min(0).sqrt() for k, v in red.items()}
    return Importance(method, **red)


def taylor_importance(model: GLM, batches) -> Importance:
    """Sum over batches of |w * dL/dw| with L the mean token loss of the batch."""
    _full_model(model)
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    # fp32 accumulators: one extra model-sized buffer (reduce_to_structures sums in fp64)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    saved = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            count = int((batch["labels"] != -100).sum())
            if count == 0:
                continue
            loss = _forward(model, batch, labels=True).sum() / count
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] += (p.detach().float() * p.grad.float()).abs()
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(saved[n])
        model.train(was_training)
    return _from_elements("taylor", acc, model.config)


@torch.no_grad()
def magnitude_importance(model: GLM) -> Importance:
    elements = {n: p.detach().double() ** 2 for n, p in model.named_parameters()}
    return _from_elements("magnitude", elements, model.config, sqrt=True)


def random_importance(config: GLMConfig, seed: int = 0) -> Importance:
    g = torch.Generator().manual_seed(seed)
    c = config
    L, nq, ng, d = c.num_layers, c.num_attention_heads, c.multi_query_group_num, c.kv_channels
    r = lambda *shape: torch.rand(shape, generator=g, dtype=torch.float64)  # noqa: E731
    return Importance("random", layers=r(L), heads=r(L, nq), groups=r(L, ng),
                      qk_pairs=r(L, ng, d // 2), v_channels=r(L, ng, d),
                      ffn=r(L, c.ffn_hidden_size), hidden=r(c.hidden_size))


LAYER_METRICS = ("method", "loss")


def compute_importance(method: str, model: GLM, batches=(), *, pad_id: int | None = 0,
                       seed: int = 0, layer_metric: str = "method") -> Importance:
    """layer_metric "method" scores layers like everything else; "loss" replaces the layer
    scores by layer_drop_importance (not for "random": the baseline stays random)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {', '.join(METHODS)}")
    if layer_metric not in LAYER_METRICS:
        raise ValueError(f"layer_metric={layer_metric!r} must be one of "
                         f"{', '.join(LAYER_METRICS)}")
    batches = list(batches)
    if (method in ("activation", "taylor") or layer_metric == "loss") and not batches:
        raise ValueError(f"method={method!r} needs at least one calibration batch")
    if method == "activation":
        imp = activation_importance(model, batches, pad_id)
    elif method == "taylor":
        imp = taylor_importance(model, batches)
    elif method == "magnitude":
        imp = magnitude_importance(model)
    else:
        return random_importance(model.config, seed)
    if layer_metric == "loss":
        imp.layers = layer_drop_importance(model, batches)
    return imp
