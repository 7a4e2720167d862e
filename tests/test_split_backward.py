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
    store.fuse_accumulation = False   # the exact mode: autograd accumulates
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


def test_exact_w_hands_a_microbatch_to_autograd_in_one_call(monkeypatch):
    # exact mode: one engine run per W op (not one per layer: on CPU each call costs about a small
    # layer's product), and still bit-for-bit one backward's gradients
    cfg = GLMConfig.preset("tiny")
    ids, labels = _batch()
    ref, model = GLM.build(cfg, seed=0), GLM.build(cfg, seed=0)
    (ref(ids, labels=labels).sum() / 32).backward()
    store = store_for(model)
    store.fuse_accumulation = False
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
    # exact mode: the same weight stashed twice per microbatch, over two microbatches: W sums its two
    # products before they reach .grad, as a plain backward's input buffer does, so the
    # accumulated gradient rounds alike: a + (g2 + g1), not (a + g2) + g1
    torch.manual_seed(0)
    lin, ref = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    ref.load_state_dict(lin.state_dict())
    xs = torch.randn(2, 5, 8, requires_grad=True)   # (an x without a graph: not deferred)
    for x in xs:
        ref(torch.tanh(ref(x))).pow(2).sum().backward()
    store = store_for(lin)
    store.fuse_accumulation = False
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


def _plain_and_split(cfg, microbatches, buckets=False):
    """(ref, model, model's buckets or None): ref by plain backwards, model by B of every
    microbatch then every W (fused, the default), both over the same microbatches."""
    from engine.optim.grad_buckets import GradBuckets
    from engine.optim.layout import FlatLayout
    ref, model = GLM.build(cfg, seed=0), GLM.build(cfg, seed=0)
    made = []
    for m in (ref, model) if buckets else ():
        named = list(m.named_parameters())
        layout = FlatLayout([(n, tuple(p.shape)) for n, p in named], bucket_numel=4096,
                            shard_world=1)
        made.append(GradBuckets([p for _, p in named], layout, torch.float32, None, 0, 1,
                                scatter=False))
    last = len(microbatches) - 1

    def sync(on):   # as no_sync(): buckets reduce only once the last microbatch is in
        for b in made:
            b.sync_enabled = on
    for mb, (ids, labels) in enumerate(microbatches):
        sync(mb == last)
        (ref(ids, labels=labels).sum() / 32).backward()
    store = store_for(model)
    assert store.fuse_accumulation
    for mb, (ids, labels) in enumerate(microbatches):
        sync(mb == last)
        with store.backward_of(mb):
            (model(ids, labels=labels).sum() / 32).backward()
    for mb in range(len(microbatches)):
        sync(mb == last)
        store.run(mb)
    assert len(store) == 0
    return ref, model, made


def _microbatches(n, seq=64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(5, 500, (2, seq), generator=g),
             torch.randint(5, 500, (2, seq), generator=g)) for _ in range(n)]


def test_fused_w_first_microbatch_is_one_backward_bitwise():
    # no accumulation yet: the GEMM's product becomes .grad, as autograd stores it
    cfg = GLMConfig.preset("tiny")
    ref, model, _ = _plain_and_split(cfg, _microbatches(1))
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=n)


def test_fused_w_accumulates_microbatches_in_the_gemm(monkeypatch):
    # four microbatches: W adds each dY^T X into .grad inside addmm_ (beta 1), never
    # through autograd: the same sum as autograd's separate add, to fp32 rounding
    cfg = GLMConfig.preset("tiny")
    calls = []
    real = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward",
                        lambda *a, **k: (calls.append(a[0]), real(*a, **k)))
    ref, model, _ = _plain_and_split(cfg, _microbatches(4))
    # the plain and B backwards: one call per microbatch each, none from W
    assert all(not isinstance(t, (list, tuple)) or all(not isinstance(x, torch.nn.Parameter)
                                                      for x in t) for t in calls)
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_fused_w_adds_into_the_data_parallel_buckets():
    # under GradBuckets W writes straight into each parameter's bucket slot (p.grad never
    # exists) and reports it, so the buckets equal a plain backward's and all are ready
    cfg = GLMConfig.preset("tiny")
    ref, model, (ref_b, model_b) = _plain_and_split(cfg, _microbatches(3), buckets=True)
    deferred = [p for n, p in model.named_parameters() if n.endswith("mlp.down.weight")]
    assert deferred and all(p.grad is None for p in model.parameters())
    assert model_b.num_launched == ref_b.num_launched == len(model_b.layout.buckets)
    torch.testing.assert_close(model_b.full_flat(), ref_b.full_flat(), rtol=1e-5, atol=1e-6)
    model_b.remove_hooks()
    from engine.optim.grad_buckets import grad_sink
    assert all(grad_sink(p) is None for p in model.parameters())


def test_fused_w_leaves_a_hooked_weight_to_autograd():
    # a tensor hook on a weight (e.g. an all-reduce of a replicated weight's gradient)
    # must run: that weight goes through autograd, the others add in place
    lin, ref = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    ref.load_state_dict(lin.state_dict())
    seen = []
    lin.weight.register_hook(lambda g: (seen.append(1), g * 2)[1])
    x = torch.randn(5, 8, requires_grad=True)
    ref(torch.tanh(x)).pow(2).sum().backward()
    store = store_for(lin)
    with store.backward_of(0):
        lin(torch.tanh(x)).pow(2).sum().backward()
    assert lin.weight.grad is None and not seen
    store.run(0)
    assert seen == [1]
    torch.testing.assert_close(lin.weight.grad, 2 * ref.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, rtol=0, atol=0)
