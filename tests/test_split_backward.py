"""B (input gradients) then W (weight gradients) gives exactly one backward's gradients,
and between the two a linear layer keeps only its input and output gradient."""
import torch

from engine.pipeline.split_backward import store_for
from model import GLM, GLMConfig


def _batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(5, 500, (2, 16), generator=g),
            torch.randint(5, 500, (2, 16), generator=g))


def test_b_then_w_equals_one_backward_bitwise():
    torch.manual_seed(0)
    cfg = GLMConfig.preset("tiny")
    ids, labels = _batch()
    ref = GLM.build(cfg, seed=0)
    for _ in range(2):   # two microbatches: accumulation into .grad as well
        (ref(ids, labels=labels).sum() / 32).backward()
    model = GLM.build(cfg, seed=0)
    store = store_for(model)
    for mb in range(2):
        with store.backward_of(mb):
            (model(ids, labels=labels).sum() / 32).backward()
    # after both B: the weights of every block's linear layers (and their biases) have
    # no gradient yet, everything else has
    held = {id(t) for pairs in store.pending.values() for w, b, _, _ in pairs
            for t in (w, b) if t is not None}
    for n, p in model.named_parameters():
        assert (p.grad is None) == (id(p) in held), n
    for i in range(cfg.num_layers):
        for name in ("attention.qkv", "attention.dense", "mlp.gate_up", "mlp.down"):
            assert id(model.get_parameter(f"layers.{i}.{name}.weight")) in held
    # what is held: per linear layer and microbatch exactly (input, output gradient)
    assert len(store.pending[0]) == len(store.pending[1]) >= 4 * cfg.num_layers
    for weight, bias, x, dy in store.pending[0]:
        assert x.shape[-1] == weight.shape[1] and dy.shape[-1] == weight.shape[0]
    store.run(0)
    store.run(1)
    assert len(store) == 0
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=n)


def test_plain_backward_through_an_installed_chunk_still_fills_weight_grads():
    cfg = GLMConfig.preset("tiny")
    ids, labels = _batch()
    ref, model = GLM.build(cfg, seed=0), GLM.build(cfg, seed=0)
    store_for(model)
    (ref(ids, labels=labels).sum() / 32).backward()
    (model(ids, labels=labels).sum() / 32).backward()
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_split_backward_under_full_recompute():
    # the recomputed forward runs inside B, so its linear layers stash for W as well
    from engine.train.recompute import recompute_layers
    cfg = GLMConfig.preset("tiny")
    ids, labels = _batch()
    ref, model = GLM.build(cfg, seed=0), GLM.build(cfg, seed=0)
    (ref(ids, labels=labels).sum() / 32).backward()
    recompute_layers(model)
    store = store_for(model)
    with store.backward_of(0):
        (model(ids, labels=labels).sum() / 32).backward()
    assert len(store) >= 4 * cfg.num_layers
    store.run(0)
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=n)
