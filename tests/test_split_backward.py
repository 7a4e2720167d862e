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


def test_w_hands_a_microbatch_to_autograd_in_one_call(monkeypatch):
    # one engine run per W op (not one per layer: on CPU each call costs about a small
    # layer's product), and still bit-for-bit one backward's gradients
    cfg = GLMConfig.preset("tiny")
    ids, labels = _batch()
    ref, model = GLM.build(cfg, seed=0), GLM.build(cfg, seed=0)
    (ref(ids, labels=labels).sum() / 32).backward()
    store = store_for(model)
    with store.backward_of(0):
        (model(ids, labels=labels).sum() / 32).backward()
    calls = []
    real = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward",
                        lambda *a, **k: (calls.append(len(a[0])), real(*a, **k)))
    stashed = len(store.pending[0])
    store.run(0)
    assert len(calls) == 1 and calls[0] >= stashed >= 4 * cfg.num_layers
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=n)


def test_a_layer_applied_twice_accumulates_like_one_backward():
    # the same weight stashed twice per microbatch, over two microbatches: W sums its two
    # products before they reach .grad, as a plain backward's input buffer does, so the
    # accumulated gradient rounds alike: a + (g2 + g1), not (a + g2) + g1
    torch.manual_seed(0)
    lin, ref = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    ref.load_state_dict(lin.state_dict())
    xs = torch.randn(2, 5, 8, requires_grad=True)   # (an x without a graph: not deferred)
    for x in xs:
        ref(torch.tanh(ref(x))).pow(2).sum().backward()
    store = store_for(lin)
    for mb, x in enumerate(xs):
        with store.backward_of(mb):
            lin(torch.tanh(lin(x))).pow(2).sum().backward()
    assert len(store.pending[0]) == 2 and lin.weight.grad is None
    store.run(0)
    store.run(1)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, rtol=0, atol=0)


def test_the_meter_sees_the_x_held_for_w_and_releases_it_after_w():
    # an armed forward keeps X alive through its hook rather than autograd's saved
    # tensors: the meter counts it all the same (once per storage), then dY at B, and
    # nothing is left after W
    from engine.pipeline.stats import SavedActivationMeter
    cfg = GLMConfig.preset("tiny")
    ids, labels = _batch()
    plain, model = GLM.build(cfg, seed=0), GLM.build(cfg, seed=0)
    ref_meter = SavedActivationMeter(plain.parameters())
    with ref_meter.hooks():
        loss = plain(ids, labels=labels).sum() / 32
    after_f_plain = ref_meter.current
    del loss
    store = store_for(model)
    meter = SavedActivationMeter(model.parameters())
    store.meter = meter
    with meter.hooks(), store.deferring():
        loss = model(ids, labels=labels).sum() / 32
    assert meter.current == after_f_plain > 0
    with store.backward_of(0):
        loss.backward()
    del loss
    dys = sum(dy.numel() * dy.element_size() for _, _, _, dy in store.pending[0])
    assert meter.current >= dys > 0     # X's and dY's until W
    store.run(0)
    assert meter.current == 0
