"""Single-process tests of the distributed optimizer: config, layout, AdamW and clipping
numerics against torch, no_sync, mixed precision, loss scaling, memory, checkpoints.
The data-parallel parity tests are in test_dp_parity.py."""
import copy

import pytest
import torch
from torch import nn

from engine.optim import DistributedOptimizer, FlatLayout, OptimConfig, merge_shards
from model import GLM, GLMConfig
from model.masks import causal_example, collate


def _toy() -> nn.Module:
    # odd shapes, 1-D and 2-D parameters, one large enough to span buckets
    torch.manual_seed(0)
    return nn.ModuleDict({"emb": nn.Embedding(37, 5), "fc": nn.Linear(5, 7),
                          "norm": nn.LayerNorm(7), "head": nn.Linear(7, 3, bias=False)})


def _feed(model: nn.Module, grads: dict):
    """Backward that makes p.grad == grads[name] exactly."""
    sum((p * grads[n]).sum() for n, p in model.named_parameters()).backward()


def _random_grads(model, gen, scale):
    return {n: torch.randn(p.shape, generator=gen) * scale for n, p in model.named_parameters()}


def _torch_adamw(model, cfg: OptimConfig):
    decay = [p for p in model.parameters() if cfg.decay_1d_params or p.ndim >= 2]
    rest = [p for p in model.parameters() if not (cfg.decay_1d_params or p.ndim >= 2)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr,
                             betas=cfg.betas, eps=cfg.eps, foreach=False)


def _glm_batch(n_rows=2, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    exs = [causal_example(torch.randint(5, 1024, (int(torch.randint(8, seq + 2, (1,),
                                                                          generator=g)),),
                                        generator=g).tolist()) for _ in range(n_rows)]
    return collate(exs, seq, pad_id=0)


def _glm_loss(model, b):
    losses = model(b["input_ids"], position_ids=b["position_ids"],
                   block_position_ids=b["block_position_ids"], prefix_lens=b["prefix_lens"],
                   labels=b["labels"])
    return losses.sum() / (b["labels"] != -100).sum()


# ---- config and layout ---------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("zero_stage", 3), ("precision", "fp8"), ("betas", (0.9, 1.0)), ("bucket_mb", 0),
    ("growth_interval", 0), ("max_grad_norm", -1.0), ("eps", 0.0), ("grad_dtype", "fp64"),
    ("lr", -1e-3), ("weight_decay", -0.1), ("min_loss_scale", 0.0)])
def test_config_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        OptimConfig(**{field: value})


def test_config_rejects_initial_below_min_scale():
    with pytest.raises(ValueError, match="initial_loss_scale"):
        OptimConfig(initial_loss_scale=1.0, min_loss_scale=4.0)


def test_layout_buckets_in_reverse_and_shards_tile():
    shapes = [("a", (5, 7)), ("b", (3,)), ("c", (11, 4)), ("d", (100,)), ("e", (2, 2))]
    lay = FlatLayout(shapes, bucket_numel=64, shard_world=3, align=16)
    # the last parameter is first in the flat space: its gradient is ready first
    assert lay.slots[-1].offset == 0
    assert [s.bucket for s in lay.slots] == sorted([s.bucket for s in lay.slots], reverse=True)
    assert all(s.offset % 16 == 0 for s in lay.slots)
    ends = sorted((s.offset, s.end) for s in lay.slots)
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))          # no overlap
    assert lay.buckets[0].start == 0 and lay.buckets[-1].end == lay.total
    assert all(x.end == y.start for x, y in zip(lay.buckets, lay.buckets[1:]))
    assert len(lay.buckets) >= 3
    for s in lay.slots:
        span = lay.buckets[s.bucket]
        assert span.start <= s.offset and s.end <= span.end and s.index in span.slots
    assert lay.total % 3 == 0 and lay.shard_size * 3 == lay.total
    for r in range(3):
        lo, hi = lay.shard_range(r)
        pieces = lay.shard_pieces(r)
        assert sum(shi - slo for _, _, _, slo, shi in pieces) == hi - lo
        assert pieces[0][3] == 0 and pieces[-1][4] == hi - lo
    for b, span in enumerate(lay.buckets):
        owners = lay.bucket_owners(b)
        assert owners[0][1] == 0 and owners[-1][2] == span.size
        assert all(x[2] == y[1] for x, y in zip(owners, owners[1:]))
    # every element of every parameter has exactly one owner
    counted = {s.name: 0 for s in lay.slots}
    for r in range(3):
        for slot, plo, phi, _ in lay.param_segments(r):
            counted[slot.name] += phi - plo
    assert counted == {s.name: s.numel for s in lay.slots}


# ---- numerics against torch ----------------------------------------------------------
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
@pytest.mark.parametrize("decay_1d", [True, False])
def test_adamw_matches_torch(zero_stage, decay_1d):
    cfg = OptimConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                      decay_1d_params=decay_1d, max_grad_norm=0.0, zero_stage=zero_stage,
                      bucket_mb=100 * 4 / 2 ** 20)
    ref = _toy()
    model = copy.deepcopy(ref)
    opt = DistributedOptimizer(model.named_parameters(), cfg)
    torch_opt = _torch_adamw(ref, cfg)
    assert len(opt.layout.buckets) > 1
    gen = torch.Generator().manual_seed(1)
    for step, lr in enumerate([1e-2, 3e-3, 2e-2, 1e-3, 5e-3]):
        grads = _random_grads(ref, gen, scale=10.0 ** (step - 2))
        _feed(model, grads)
        _feed(ref, grads)
        for group in torch_opt.param_groups:
            group["lr"] = lr
        torch_opt.step()
        torch_opt.zero_grad()
        norm, skipped = opt.step(lr=lr)
        assert not skipped
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=f"{n} step {step}")
    full = opt.full_state()["params"]
    for n, q in ref.named_parameters():
        st = torch_opt.state[q]
        torch.testing.assert_close(full[n]["exp_avg"], st["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(full[n]["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-6,
                                   atol=1e-12)


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clipping_matches_torch(max_norm):
    cfg = OptimConfig(lr=1e-2, weight_decay=0.0, max_grad_norm=max_norm, zero_stage=1)
    ref = _toy()
    model = copy.deepcopy(ref)
    opt = DistributedOptimizer(model, cfg)
    torch_opt = _torch_adamw(ref, cfg)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        grads = _random_grads(ref, gen, scale=1.0)
        _feed(model, grads)
        _feed(ref, grads)
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), max_norm,
                                                  foreach=False)
        torch_opt.step()
        torch_opt.zero_grad()
        norm, skipped = opt.step()
        assert not skipped
        assert norm == pytest.approx(ref_norm.item(), rel=1e-6)
        if max_norm < 1:
            assert norm > 10 * max_norm  # clipping really happened
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


# ---- gradient accumulation -----------------------------------------------------------
def test_no_sync_accumulates_and_a_late_gradient_raises():
    model = _toy()
    opt = DistributedOptimizer(model, OptimConfig(bucket_mb=100 * 4 / 2 ** 20))
    gen = torch.Generator().manual_seed(3)
    g1, g2 = _random_grads(model, gen, 1.0), _random_grads(model, gen, 1.0)
    with opt.no_sync():
        _feed(model, g1)
    assert opt.grads.num_launched == 0
    assert all(p.grad is None for p in model.parameters())  # the buckets hold them
    _feed(model, g2)
    assert opt.grads.num_launched == len(opt.layout.buckets)
    full = opt.full_grads()
    for n in g1:
        torch.testing.assert_close(full[n], g1[n] + g2[n])
    with pytest.raises(RuntimeError, match="after its bucket was reduced"):
        _feed(model, g1)
    opt.zero_grad()
    _feed(model, g1)
    torch.testing.assert_close(opt.full_grads()["fc.weight"], g1["fc.weight"])


def test_bad_params_get_a_clear_error():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        DistributedOptimizer(frozen, OptimConfig())
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="listed twice"):
        DistributedOptimizer([("a", p), ("b", p)], OptimConfig())


# ---- mixed precision -----------------------------------------------------------------
def test_fp32_grad_accumulation_for_bf16_params():
    model = _toy()
    opt = DistributedOptimizer(model, OptimConfig(precision="bf16", grad_dtype="fp32"))
    assert model.fc.weight.dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    g1, g2 = _random_grads(model, gen, 1.0), _random_grads(model, gen, 1e-3)
    with opt.no_sync():
        _feed(model, g1)
    _feed(model, g2)
    assert all(b.dtype == torch.float32 for b in opt.grads.buffers)
    full = opt.full_grads()
    for n in g1:  # each microbatch's bf16 gradient, summed without bf16 rounding
        expected = g1[n].bfloat16().float() + g2[n].bfloat16().float()
        assert torch.equal(full[n], expected)
        assert not torch.equal(full[n], (g1[n].bfloat16() + g2[n].bfloat16()).float())



def test_bf16_master_weights_stay_fp32():
    cfg = GLMConfig.preset("tiny")
    ref = GLM.build(cfg, seed=0)
    model = GLM.build(cfg, seed=0)
    ocfg = OptimConfig(precision="bf16", max_grad_norm=0.0, weight_decay=0.0)
    opt = DistributedOptimizer(model.named_parameters(), ocfg)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert opt.master.dtype == torch.float32
    master0 = opt.full_state()["params"]
    for n, q in ref.named_parameters():  # master keeps the fp32 init, not its bf16 copy
        assert torch.equal(master0[n]["master"], q.detach())
    _glm_loss(model, _glm_batch()).backward()
    grads = opt.full_grads()
    assert all(g.dtype == torch.float32 for g in grads.values())
    # an update far below bf16 resolution (weights ~0.02, bf16 step ~1e-4)
    torch_opt = _torch_adamw(ref, ocfg)
    for n, q in ref.named_parameters():
        q.grad = grads[n]
    torch_opt.param_groups[0]["lr"] = torch_opt.param_groups[1]["lr"] = 1e-6
    torch_opt.step()
    opt.step(lr=1e-6)
    master = opt.full_state()["params"]
    moved = kept = total = 0
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        m = master[n]["master"]
        assert m.dtype == torch.float32
        torch.testing.assert_close(m, q.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(p, m.to(torch.bfloat16))   # the model holds the rounded master
        moved += int((m != master0[n]["master"]).sum())
        kept += int((m != m.to(torch.bfloat16).float()).sum())
        total += m.numel()
    assert moved > 0.5 * total and kept > 0.5 * total


def test_fp16_loss_scaling_skips_on_inf_and_recovers():
    cfg = GLMConfig.preset("tiny")
    ref = GLM.build(cfg, seed=0)
    model = GLM.build(cfg, seed=0)
    opt = DistributedOptimizer(model, OptimConfig(precision="fp16", initial_loss_scale=1024.0,
                                                  min_loss_scale=256.0, growth_interval=2,
                                                  max_grad_norm=1.0))
    batch = _glm_batch()
    assert model.embedding.weight.dtype == torch.float16 and opt.loss_scale == 1024.0

    def backward(poison=False):
        loss = _glm_loss(model, batch)
        opt.scale_loss(loss * float("inf") if poison else loss).backward()

    # unscaling: the optimizer sees true gradients (fp16 rounding aside)
    backward()
    grads = opt.full_grads()
    _glm_loss(ref, batch).backward()
    num = sum(float((grads[n] - q.grad).norm() ** 2) for n, q in ref.named_parameters())
    den = sum(float(q.grad.norm() ** 2) for q in ref.parameters())
    assert (num / den) ** 0.5 < 1e-2
    assert opt.step() == (pytest.approx(den ** 0.5, rel=1e-2), False)
    assert opt.loss_scale == 1024.0
    backward()
    assert not opt.step().skipped
    assert opt.loss_scale == 2048.0                  # grown after 2 clean steps
    before = [p.detach().clone() for p in model.parameters()]
    state = opt.state_dict()
    backward(poison=True)
    norm, skipped = opt.step()
    assert skipped and not torch.isfinite(torch.tensor(norm))
    assert opt.loss_scale == 1024.0 and opt.step_count == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for key in ("master", "exp_avg", "exp_avg_sq"):
        assert torch.equal(getattr(opt, key), state[key])
    backward(poison=True)
    assert opt.step().skipped and opt.loss_scale == 512.0
    backward(poison=True)
    assert opt.step().skipped and opt.loss_scale == 256.0   # the floor: min_loss_scale
    backward(poison=True)
    assert opt.step().skipped and opt.loss_scale == 256.0
    backward()
    assert not opt.step().skipped and opt.step_count == 3
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ---- memory and checkpoints ----------------------------------------------------------
def test_state_bytes_count_master_moments_and_grads():
    model = _toy()
    fp32 = DistributedOptimizer(copy.deepcopy(model), OptimConfig(zero_stage=1))
    total = fp32.layout.total
    assert fp32.state_bytes() == {"master": 0, "exp_avg": 4 * total, "exp_avg_sq": 4 * total,
                                  "grads": 4 * total, "total": 12 * total}
    bf16 = DistributedOptimizer(copy.deepcopy(model), OptimConfig(zero_stage=1,
                                                                  precision="bf16"))
    assert bf16.state_bytes()["master"] == 4 * total and bf16.state_bytes()["grads"] == 2 * total
    zero2 = DistributedOptimizer(copy.deepcopy(model), OptimConfig(zero_stage=2,
                                                                   precision="bf16"))
    assert zero2.state_bytes()["grads"] == 2 * total   # the bf16 shard (all of it at dp=1)


def test_state_dict_roundtrip_continues_bitwise():
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5, zero_stage=2,
                      bucket_mb=100 * 4 / 2 ** 20)
    model = _toy()
    twin = copy.deepcopy(model)
    opt = DistributedOptimizer(model, cfg)
    gen = torch.Generator().manual_seed(4)
    steps = [_random_grads(model, gen, 1.0) for _ in range(3)]
    for g in steps[:2]:
        _feed(model, g)
        opt.step()
    sd = opt.state_dict()
    assert sd["meta"]["step"] == 2 and sd["meta"]["params"][0]["name"] == "emb.weight"
    merged = merge_shards([sd])
    full = opt.full_state()
    for n in full["params"]:
        for k in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(merged["params"][n][k], full["params"][n][k])
    _feed(model, steps[2])
    opt.step()
    # a fresh optimizer on a fresh model: loading restores the weights too. The same
    # ZeRO stage continues bitwise; another stage sums the norm in another order (1 ulp)
    for source, stage in ((sd, 2), ([sd], 2), (merged, 2), (sd, 0), (merged, 1)):
        model2 = copy.deepcopy(twin)
        opt2 = DistributedOptimizer(model2, OptimConfig(**{**vars(cfg), "zero_stage": stage}))
        opt2.load_state_dict(source)
        assert opt2.step_count == 2
        for p, q in zip(model2.parameters(), merged["params"].values()):
            assert torch.equal(p, q["master"])
        _feed(model2, steps[2])
        opt2.step()
        for p, q in zip(model2.parameters(), model.parameters()):
            if stage == 2:
                assert torch.equal(p, q)
            else:
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_load_rejects_mismatched_state():
    opt = DistributedOptimizer(_toy(), OptimConfig(zero_stage=1))
    sd = opt.state_dict()
    other = DistributedOptimizer(nn.Linear(3, 3), OptimConfig())
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict(sd)
    half = {**sd, "meta": {**sd["meta"], "shard": [0, opt.layout.total // 2]}}
    with pytest.raises(ValueError, match="do not cover"):
        opt.load_state_dict([half])
    bad = merge_shards([sd])
    bad["params"]["fc.weight"] = {k: t.t() for k, t in bad["params"]["fc.weight"].items()}
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
