"""Importance scores: each method finds a planted zero structure, Taylor and magnitude
aggregate exactly what the structure owns, activation scoring is forward-only and
ignores padding."""
import math

import pytest
import torch

from engine.recipe.compress.importance import (activation_importance, compute_importance,
                                        magnitude_importance, random_importance,
                                        taylor_importance)
from engine.recipe.compress.structure import split_qkv
from model import GLM
from test_prune import (build, make_batch, zero_group, zero_hidden, zero_layer,
                        zero_neuron, zero_qk_pair, zero_v_channel)


pytestmark = pytest.mark.usefixtures("single_thread")


BATCHES = [make_batch(seed=s) for s in range(2)]

# (structure, config overrides, plant(model), where the planted score sits)
PLANTS = {
    # MHA: a head's context is its own V group's, so zeroing what it owns silences it
    "heads": (dict(multi_query_group_num=4), lambda m: zero_group(m, 1, 2),
              lambda imp: imp.heads[1], 2),
    "groups": ({}, lambda m: zero_group(m, 2, 0), lambda imp: imp.groups[2], 0),
    "qk_pairs": ({}, lambda m: zero_qk_pair(m, 0, 5), lambda imp: imp.qk_pairs[0].sum(0), 5),
    "v_channels": ({}, lambda m: zero_v_channel(m, 3, 9), lambda imp: imp.v_channels[3, 1], 9),
    "ffn": ({}, lambda m: zero_neuron(m, 1, 77), lambda imp: imp.ffn[1], 77),
    "hidden": ({}, lambda m: zero_hidden(m, 13), lambda imp: imp.hidden, 13),
    "layers": ({}, lambda m: zero_layer(m, 2), lambda imp: imp.layers, 2),
}


@pytest.mark.parametrize("structure", list(PLANTS))
@pytest.mark.parametrize("method", ["activation", "taylor", "magnitude"])
def test_planted_zero_structure_is_least_important(method, structure):
    over, plant, scores_of, where = PLANTS[structure]
    model = build(**over)
    plant(model)
    imp = compute_importance(method, model, BATCHES)
    imp.check(model.config)
    scores = scores_of(imp).double()
    others = torch.cat([scores[:where], scores[where + 1:]])
    assert int(scores.argmin()) == where
    assert scores[where] < 1e-3 * others.min(), (scores[where], others.min())


def test_random_scores_are_seeded_and_ignore_the_weights():
    model = build()
    a = compute_importance("random", model, seed=4)
    zero_layer(model, 0)
    b = compute_importance("random", model, seed=4)
    c = random_importance(model.config, seed=5)
    assert torch.equal(a.heads, b.heads) and torch.equal(a.hidden, b.hidden)
    assert not torch.equal(a.ffn, c.ffn)
    a.check(model.config)


def test_taylor_and_magnitude_sum_what_a_structure_owns():
    model = build()
    c = model.config
    taylor = taylor_importance(model, BATCHES)
    # the same by hand for FFN neuron 7 and query head 3 of layer 1
    grads = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for b in BATCHES:
        model.zero_grad()
        loss = model(b["input_ids"], position_ids=b["position_ids"],
                     block_position_ids=b["block_position_ids"], prefix_lens=b["prefix_lens"],
                     labels=b["labels"]).sum() / (b["labels"] != -100).sum()
        loss.backward()
        for n, p in model.named_parameters():
            grads[n] += (p.detach().double() * p.grad.double()).abs()
    f, pre = c.ffn_hidden_size, "layers.1."
    neuron = (grads[pre + "mlp.gate_up.weight"][[7, f + 7]].sum()
              + grads[pre + "mlp.down.weight"][:, 7].sum())
    assert taylor.ffn[1, 7].item() == pytest.approx(neuron.item(), rel=1e-6)
    q_w, _, _ = split_qkv(grads[pre + "attention.qkv.weight"], c)
    q_b, _, _ = split_qkv(grads[pre + "attention.qkv.bias"], c)
    dense = grads[pre + "attention.dense.weight"].view(c.hidden_size, -1, c.kv_channels)
    head = q_w[3].sum() + q_b[3].sum() + dense[:, 3].sum()
    assert taylor.heads[1, 3].item() == pytest.approx(head.item(), rel=1e-6)

    mag = magnitude_importance(model)
    p = dict(model.named_parameters())
    w = (p[pre + "mlp.gate_up.weight"][[7, f + 7]].double().pow(2).sum()
         + p[pre + "mlp.down.weight"][:, 7].double().pow(2).sum())
    assert mag.ffn[1, 7].item() == pytest.approx(math.sqrt(w.item()), rel=1e-9)


def test_activation_is_forward_only_and_ignores_padding():
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # one real row, padded to 24 or not padded at all: the same tokens, the same scores
    # (right padding sits after every real token, so no real token attends to it)
    row = make_batch(b=1)
    n = int((row["input_ids"] != 0).sum())
    tight = {k: (v[:, :n] if v.ndim == 2 else v) for k, v in row.items()}
    a = activation_importance(model, [row], pad_id=0)
    b = activation_importance(model, [tight], pad_id=0)
    for name in ("layers", "heads", "qk_pairs", "v_channels", "ffn", "hidden"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-9)
    # counting the pads would change the scores
    c = activation_importance(model, [row], pad_id=None)
    assert not torch.allclose(a.ffn, c.ffn)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None, name
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bad_requests_are_refused():
    model = build()
    with pytest.raises(ValueError, match="method='fisher'"):
        compute_importance("fisher", model, BATCHES)
    with pytest.raises(ValueError, match="calibration batch"):
        compute_importance("activation", model, [])
    stage = GLM.build(model.config, layer_range=(0, 2), post_process=False)
    with pytest.raises(ValueError, match="whole model"):
        activation_importance(stage, BATCHES)
    imp = random_importance(model.config)
    imp.ffn = imp.ffn[:, :10]
    with pytest.raises(ValueError, match="importance.ffn has shape"):
        imp.check(model.config)


def test_layer_drop_importance_is_the_greedy_removal_order():
    from engine.recipe.compress.importance import layer_drop_importance
    model = build().eval()
    zero_layer(model, 1)            # an identity block: skipping it changes nothing
    ref = model(BATCHES[0]["input_ids"]).detach()
    scores = layer_drop_importance(model, BATCHES)

    def loss_without(layers):       # the plain reference: rebuild the model without them
        from engine.recipe.compress.prune import full_selection, prune_model
        sel = full_selection(model.config)
        sel.layers = [i for i in range(4) if i not in layers]
        m = prune_model(model, sel)
        with torch.no_grad():
            return sum(m(b["input_ids"], position_ids=b["position_ids"],
                         block_position_ids=b["block_position_ids"],
                         prefix_lens=b["prefix_lens"], labels=b["labels"]).sum().item()
                       for b in BATCHES) / sum(int((b["labels"] != -100).sum()) for b in BATCHES)

    dropped = []
    for _ in range(3):
        left = [i for i in range(4) if i not in dropped]
        dropped.append(min(left, key=lambda i: loss_without(dropped + [i])))
    assert [int(scores[i]) for i in dropped] == [0, 1, 2]
    assert sorted(scores.tolist()) == [0.0, 1.0, 2.0, 3.0]
    assert loss_without([1]) == pytest.approx(loss_without([]), abs=1e-6)
    imp = compute_importance("activation", model, BATCHES, layer_metric="loss")
    assert torch.equal(imp.layers, scores)
    # hooks are gone: the model computes what it did before
    assert torch.equal(model(BATCHES[0]["input_ids"]).detach(), ref)
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="layer_metric='depth'"):
        compute_importance("activation", model, BATCHES, layer_metric="depth")
