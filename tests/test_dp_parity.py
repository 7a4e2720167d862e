"""Data parallelism (dp=2, gloo) against one process: ZeRO 0/1/2 with clipping on and
off, the overflow check agreed across ranks, memory per rank, re-sharding dp=2 -> 1 -> 2.

One spawn runs every scenario (spawning costs more than the tiny model's steps); the
single-process reference is computed here and handed to the workers, which return
errors and flags that the tests below assert on."""
import contextlib

import pytest
import torch
import torch.distributed as dist

from dist import one_thread, run_workers
from engine.optim import DistributedOptimizer, OptimConfig
from model import GLM, GLMConfig
from model.masks import collate, corrupt_spans, gmask_example

STEPS, MICRO, LRS = 3, 4, (1e-3, 3e-3, 2e-3)       # MICRO microbatches per global batch
CLIP = 0.5                                         # below every step's norm (asserted)
CONFIGS = [(z, c) for z in (0, 1, 2) for c in (CLIP, 0.0)]
BUCKET_MB = 0.05                                   # ~13k fp32 elements: many buckets


def _optim_cfg(**kw) -> OptimConfig:
    return OptimConfig(**{**dict(betas=(0.9, 0.95), weight_decay=0.1, bucket_mb=BUCKET_MB),
                          **kw})


def _batches():
    """[step][microbatch] batches of the GLM objective ([gMASK] and span-corruption rows:
    prefix attention and 2D positions) of varying length, so microbatches carry
    different label counts."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(STEPS):
        mbs = []
        for m in range(MICRO):
            exs = []
            for r in range(2):
                toks = torch.randint(5, 1024, (int(torch.randint(8, 14, (1,), generator=g)),),
                                     generator=g).tolist()
                exs.append(corrupt_spans(toks, 1, 2, 3, g, ratio=0.3) if (m + r) % 2 else
                           gmask_example(toks, len(toks) // 2, 4, 2, 3))
            mbs.append(collate(exs, 20, pad_id=0))
        out.append(mbs)
    return out


def _loss(model, mb, num_tokens):
    losses = model(mb["input_ids"], position_ids=mb["position_ids"],
                   block_position_ids=mb["block_position_ids"], prefix_lens=mb["prefix_lens"],
                   labels=mb["labels"])
    return losses.sum() / num_tokens  # the engine's convention: / global label count


def _tokens(mbs):
    return int(sum((mb["labels"] != -100).sum() for mb in mbs))


def _backward_all(opt, model, mbs, num_tokens):
    """Accumulate over `mbs`, reducing only on the last one (as the schedule does)."""
    for i, mb in enumerate(mbs):
        with opt.no_sync() if i < len(mbs) - 1 else contextlib.nullcontext():
            opt.scale_loss(_loss(model, mb, num_tokens)).backward()


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _reference(clip):
    """One process, every microbatch, plain autograd accumulation, clip_grad_norm_'s
    rule, torch.optim.AdamW (1-D parameters without weight decay)."""
    model = GLM.build(GLMConfig.preset("tiny"), seed=0)
    cfg = _optim_cfg()
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for _, p in named if p.ndim >= 2],
                              "weight_decay": cfg.weight_decay},
                             {"params": [p for _, p in named if p.ndim < 2],
                              "weight_decay": 0.0}], betas=cfg.betas, eps=cfg.eps,
                            foreach=False)
    grads, params, norms = [], [], []
    for step, mbs in enumerate(_batches()):
        n = _tokens(mbs)
        # Sum in dp=2's order, (mb0 + mb1) + (mb2 + mb3), so both runs round alike: Adam
        # divides every element by its own magnitude, so reordering noise (~1e-7 of the
        # largest gradient) in near-zero elements would come back as O(lr) differences.
        halves = []
        for half in (mbs[:MICRO // 2], mbs[MICRO // 2:]):
            for mb in half:
                _loss(model, mb, n).backward()
            halves.append({k: p.grad for k, p in named})
            opt.zero_grad()
        for k, p in named:
            p.grad = halves[0][k] + halves[1][k]
        grads.append({k: p.grad.clone() for k, p in named})
        # clip_grad_norm_'s rule with an fp64 norm: torch's fp32 norm is off by ~5e-7,
        # which Adam amplifies like reordering noise (test_optimizer checks the rule
        # against clip_grad_norm_ itself)
        norm = sum(float(p.grad.double().pow(2).sum()) for _, p in named) ** 0.5
        if clip > 0:
            coef = min(1.0, clip / (norm + 1e-6))
            for _, p in named:
                p.grad.mul_(coef)
        norms.append(norm)
        for group in opt.param_groups:
            group["lr"] = LRS[step]
        opt.step()
        opt.zero_grad()
        params.append({k: p.detach().clone() for k, p in named})
    return {"grads": grads, "params": params, "norms": norms}


def _ranks_agree(model, group) -> float:
    """max |param difference| between the two ranks."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    both = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(both, flat, group=group)
    return float((both[0] - both[1]).abs().max())


def _parity_run(rank, group, batches, ref, zero, clip):
    model = GLM.build(GLMConfig.preset("tiny"), seed=0)
    opt = DistributedOptimizer(model.named_parameters(), _optim_cfg(zero_stage=zero,
                                                                    max_grad_norm=clip),
                               dp_group=group)
    out = {"grad_err": [], "param_err": [], "norms": [], "launched_in_no_sync": [],
           "launched_by_hooks": [], "buckets": len(opt.layout.buckets)}
    for step, mbs in enumerate(batches):
        mine = mbs[rank * MICRO // 2:(rank + 1) * MICRO // 2]
        n = _tokens(mbs)
        with opt.no_sync():
            _loss(model, mine[0], n).backward()
        out["launched_in_no_sync"].append(opt.grads.num_launched)
        _loss(model, mine[1], n).backward()
        out["launched_by_hooks"].append(opt.grads.num_launched)
        grads = opt.full_grads()
        out["grad_err"].append(max(_rel(grads[k], g) for k, g in ref["grads"][step].items()))
        norm, skipped = opt.step(lr=LRS[step])
        assert not skipped
        out["norms"].append(norm)
        out["param_err"].append(max(_rel(p.detach(), ref["params"][step][k])
                                    for k, p in model.named_parameters()))
    out["rank_diff"] = _ranks_agree(model, group)
    return out


def _overflow_run(rank, group, batches):
    """fp16, ZeRO 2: an inf that only rank 1's gradient shard holds must skip both."""
    model = GLM.build(GLMConfig.preset("tiny"), seed=0)
    opt = DistributedOptimizer(model, _optim_cfg(zero_stage=2, precision="fp16",
                                                 initial_loss_scale=1024.0), dp_group=group)
    mine = [mbs[rank * 2:rank * 2 + 2] for mbs in batches]
    out = {}
    _backward_all(opt, model, mine[0], _tokens(batches[0]))
    out["first"] = opt.step(lr=LRS[0])
    before = [p.detach().clone() for p in model.parameters()]
    _backward_all(opt, model, mine[1], _tokens(batches[1]))
    opt.grads.finish()
    if rank == 1:
        first_param_element = opt._segments[0][3]
        opt.grads.grad_shard[first_param_element] = float("inf")
    out["poisoned"] = opt.step(lr=LRS[1])
    out["scale_after"] = opt.loss_scale
    out["unchanged"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    _backward_all(opt, model, mine[1], _tokens(batches[1]))
    out["recovered"] = opt.step(lr=LRS[1])
    out["changed"] = not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    return out


def _reshard_run(rank, group, batches):
    """dp=2 ZeRO 2 for two steps -> state of both ranks -> a dp=1 optimizer (here, no
    group) takes step 3 over all microbatches; its state loaded back onto dp=2 takes
    step 3 again. Both must match dp=2 continuing without a checkpoint."""
    cfg = _optim_cfg(zero_stage=2, max_grad_norm=CLIP)
    model = GLM.build(GLMConfig.preset("tiny"), seed=0)
    opt = DistributedOptimizer(model, cfg, dp_group=group)
    halves = [mbs[rank * 2:rank * 2 + 2] for mbs in batches]
    for step in range(2):
        _backward_all(opt, model, halves[step], _tokens(batches[step]))
        opt.step(lr=LRS[step])
    shards = [None, None]
    dist.all_gather_object(shards, opt.state_dict(), group=group)
    _backward_all(opt, model, halves[2], _tokens(batches[2]))
    opt.step(lr=LRS[2])
    expected = {k: p.detach().clone() for k, p in model.named_parameters()}

    single = GLM.build(GLMConfig.preset("tiny"), seed=7)       # weights come from the state
    opt1 = DistributedOptimizer(single, OptimConfig(**{**vars(cfg), "zero_stage": 1}))
    opt1.load_state_dict(shards)
    dp1_state = opt1.state_dict()
    _backward_all(opt1, single, batches[2], _tokens(batches[2]))
    opt1.step(lr=LRS[2])
    out = {"dp1_step": opt1.step_count,
           "dp1_err": max(_rel(p.detach(), expected[k]) for k, p in single.named_parameters())}

    back = GLM.build(GLMConfig.preset("tiny"), seed=8)
    opt2 = DistributedOptimizer(back, cfg, dp_group=group)
    opt2.load_state_dict([dp1_state])
    _backward_all(opt2, back, halves[2], _tokens(batches[2]))
    opt2.step(lr=LRS[2])
    out["back_bitwise"] = all(torch.equal(p.detach(), expected[k])
                              for k, p in back.named_parameters())
    return out


def _memory_run(group):
    out = {}
    for precision in ("fp32", "bf16"):
        for zero in (0, 1, 2):
            model = GLM.build(GLMConfig.preset("tiny"), seed=0)
            opt = DistributedOptimizer(model, _optim_cfg(zero_stage=zero, precision=precision),
                                       dp_group=group)
            out[precision, zero] = opt.state_bytes()
    return out


def _model_parallel_run(rank, group):
    """No dp; the two ranks hold the two row halves of one weight (tensor parallel) plus a
    replicated vector marked tp_replicated: the clip norm must count each element once
    and clip both ranks alike, as one process holding the full weight would."""
    g = torch.Generator().manual_seed(5)
    w, r, gw, gr = (torch.randn(shape, generator=g) for shape in ((6, 4), (4,), (6, 4), (4,)))
    rows = slice(3 * rank, 3 * rank + 3)
    shard, replicated = torch.nn.Parameter(w[rows].clone()), torch.nn.Parameter(r.clone())
    replicated.tp_replicated = True
    cfg = OptimConfig(lr=1e-2, max_grad_norm=0.5)
    opt = DistributedOptimizer([("w", shard), ("r", replicated)], cfg,
                               model_parallel_group=group, tp_rank=rank)
    ((shard * gw[rows]).sum() + (replicated * gr).sum()).backward()
    norm, skipped = opt.step()
    full_w, full_r = torch.nn.Parameter(w.clone()), torch.nn.Parameter(r.clone())
    full_w.grad, full_r.grad = gw.clone(), gr.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_([full_w, full_r], 0.5, foreach=False)
    torch.optim.AdamW([full_w, full_r], lr=1e-2, weight_decay=0.0, foreach=False).step()
    return {"norm": norm, "ref_norm": ref_norm.item(), "skipped": skipped,
            "w_err": _rel(shard.detach(), full_w.detach()[rows]),
            "r_err": _rel(replicated.detach(), full_r.detach())}


def _worker(rank, world, refs):
    group = dist.new_group(list(range(world)))   # an explicit dp group, not the default
    batches = _batches()
    return {"parity": {(z, c): _parity_run(rank, group, batches, refs[c], z, c)
                       for z, c in CONFIGS},
            "overflow": _overflow_run(rank, group, batches),
            "reshard": _reshard_run(rank, group, batches),
            "memory": _memory_run(group),
            "model_parallel": _model_parallel_run(rank, group)}


@pytest.fixture(scope="module")
def dp2():
    with one_thread():
        refs = {c: _reference(c) for c in (CLIP, 0.0)}
    return run_workers(_worker, 2, refs, timeout=120), refs


@pytest.mark.parametrize("zero,clip", CONFIGS)
def test_dp2_matches_single_process(dp2, zero, clip):
    results, refs = dp2
    for rank, res in enumerate(results):
        r = res["parity"][zero, clip]
        assert max(r["grad_err"]) < 1e-5, (rank, r["grad_err"])
        assert max(r["param_err"]) < 1e-5, (rank, r["param_err"])
        assert r["norms"] == pytest.approx(refs[clip]["norms"], rel=1e-5)
        assert r["rank_diff"] == 0.0            # every rank holds the same model
    if clip:
        assert min(refs[clip]["norms"]) > clip  # clipping really happened every step
    norms = [res["parity"][zero, clip]["norms"] for res in results]
    assert norms[0] == norms[1]                 # the same norm on every rank, bit for bit


def test_reduction_starts_in_backward_and_waits_for_last_microbatch(dp2):
    results, _ = dp2
    for res in results:
        for r in res["parity"].values():
            assert r["buckets"] > 2
            assert r["launched_in_no_sync"] == [0] * STEPS
            assert r["launched_by_hooks"] == [r["buckets"]] * STEPS


def test_overflow_on_one_rank_skips_on_every_rank(dp2):
    results, _ = dp2
    for res in results:
        o = res["overflow"]
        assert not o["first"].skipped
        assert o["poisoned"].skipped and o["poisoned"].grad_norm == float("inf")
        assert o["scale_after"] == 512.0 and o["unchanged"]
        assert not o["recovered"].skipped and o["changed"]


def test_zero2_halves_optimizer_bytes_per_rank(dp2):
    results, _ = dp2
    for precision in ("fp32", "bf16"):
        for zero in (0, 1, 2):
            model = GLM.build(GLMConfig.preset("tiny"), seed=0)
            dp1 = DistributedOptimizer(model, _optim_cfg(zero_stage=zero,
                                                         precision=precision)).state_bytes()
            dp2_bytes = results[0]["memory"][precision, zero]
            assert dp2_bytes == results[1]["memory"][precision, zero]
            ratio = dp2_bytes["total"] / dp1["total"]
            if zero == 0:
                assert ratio == 1.0
            if zero >= 1:   # master weights and moments are sharded
                states = ("master", "exp_avg", "exp_avg_sq")
                assert sum(dp2_bytes[k] for k in states) == pytest.approx(
                    sum(dp1[k] for k in states) / 2, rel=0.1)
            if zero == 2:   # and gradients: everything halves
                assert ratio == pytest.approx(0.5, rel=0.1)


def test_reshard_dp2_to_dp1_and_back(dp2):
    results, _ = dp2
    for res in results:
        r = res["reshard"]
        assert r["dp1_step"] == 3
        assert r["dp1_err"] < 1e-5
        assert r["back_bitwise"]


def test_norm_over_model_parallel_group_counts_replicated_once(dp2):
    results, _ = dp2
    for res in results:
        m = res["model_parallel"]
        assert not m["skipped"]
        assert m["norm"] == pytest.approx(m["ref_norm"], rel=1e-6)
        assert m["norm"] > 0.5                   # so the clip applied
        assert m["w_err"] < 1e-6 and m["r_err"] < 1e-6
    assert results[0]["model_parallel"]["norm"] == results[1]["model_parallel"]["norm"]
