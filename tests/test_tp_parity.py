"""Tensor-parallel layouts reproduce the single-process GLM: losses, gradients (gathered
to full shape) and updated parameters after each of 3 AdamW steps, fp32, from the same
seed and data. Each step accumulates a prefix-LM and a blank-infilling batch; the loss is
normalised by the global label count.

Workers return numpy copies; the parent computes the single-process reference.
"""
import functools

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist import run_workers
from engine.tensor_parallel import (gather_full_state_dict, gather_full_tensors, parallelize,
                                    shard_state_dict)
from model import GLM, GLMConfig
from model.generate import generate
from model.masks import IGNORE, GLMExample, causal_example, collate, corrupt_spans

SEQ, BATCH, STEPS = 16, 2, 3
PAD, MASK, SOP, EOP = 0, 1, 2, 3
RTOL = 1e-5
# Adam divides each gradient entry by its own magnitude, so an entry whose gradient is
# fp32 rounding noise (|g| ~ 1e-8, where TP's split matmuls and sums differ from one
# process in the last bits) turns into a full-size update of either sign. With the default
# eps=1e-8 and lr=1e-2 one step leaves parameters 3e-2 apart while the gradients agree to
# 6e-7. An eps above that noise floor (update error <= lr * |dg| / (4 eps)) keeps the
# comparison about the parallelism, not about Adam's conditioning.
ADAMW = dict(lr=1e-3, weight_decay=0.1, eps=1e-4)
PROMPTS = [[11, 12, 13, 14, MASK], [40, 41, MASK]]

# name -> (config overrides, sequence_parallel); tp comes from the worker
CASES = {
    "tp2 plain": (dict(), False),
    "tp2 sp": (dict(), True),
    # MQA: tp=2 > 1 KV group, the group replicated on both ranks; biases everywhere
    "tp2 sp mqa bias": (dict(multi_query_group_num=1, add_bias_linear=True), True),
    "tp2 dropout": (dict(hidden_dropout=0.1), False),
    # GQA: 4 heads, 2 groups, tp=4: each group shared by two ranks (its KV cache too)
    "tp4 gqa": (dict(multi_query_group_num=2), False),
}


pytestmark = pytest.mark.usefixtures("single_thread")


def config(**overrides) -> GLMConfig:
    return GLMConfig.preset("tiny", kernels="torch", **overrides)


def batches(step: int) -> list[dict]:
    """Per step: a prefix-LM batch (bidirectional prefix, loss after it) and a GLM
    blank-infilling batch (2D positions, spans in shuffled order)."""
    g = torch.Generator().manual_seed(100 + step)
    toks = lambda n: torch.randint(10, 1024, (n,), generator=g).tolist()  # noqa: E731
    prefix_lm = []
    for r in range(BATCH):
        ex, prefix = causal_example(toks(SEQ - r)), 4 + 2 * r
        labels = [IGNORE] * (prefix - 1) + ex.labels[prefix - 1:]
        prefix_lm.append(GLMExample(ex.input_ids, ex.position_ids, ex.block_position_ids,
                                    labels, prefix))
    blank = [corrupt_spans(toks(11), MASK, SOP, EOP, g, ratio=0.3) for _ in range(BATCH)]
    return [collate(prefix_lm, SEQ, PAD), collate(blank, SEQ, PAD)]


def build(cfg: GLMConfig) -> GLM:
    """The full model; biases (zero at init) get small random values, so that a wrongly
    sliced bias shows in the forward and the first update is not measured against 0."""
    model = GLM.build(cfg, seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def label_count(mbs) -> int:
    return int(sum((mb["labels"] != IGNORE).sum() for mb in mbs))


def train_step(model, opt, step):
    mbs = batches(step)
    n = label_count(mbs)
    opt.zero_grad(set_to_none=True)
    loss = 0.0
    for mb in mbs:
        per_token = model(**{k: v for k, v in mb.items() if k != "labels"}, labels=mb["labels"])
        mb_loss = per_token.sum() / n
        mb_loss.backward()
        loss += mb_loss.item()
    return loss


def numpy_dict(d):
    return {k: v.detach().clone().numpy() for k, v in d.items()}


@functools.lru_cache(maxsize=None)
def reference(name: str):
    overrides, _ = CASES[name]
    model = build(config(**overrides))
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    torch.manual_seed(1234)  # dropout masks
    out = []
    for step in range(STEPS):
        loss = train_step(model, opt, step)
        grads = {n: p.grad for n, p in model.named_parameters()}
        norm = float(sum(g.double().pow(2).sum() for g in grads.values()))
        grads = numpy_dict(grads)
        opt.step()
        out.append(dict(loss=loss, grads=grads, grad_sq_norm=norm,
                        params=numpy_dict(dict(model.named_parameters()))))
    model.eval()
    gen = generate(model, PROMPTS, max_new_tokens=5, eos_id=EOP, pad_id=PAD, sop_id=SOP)
    return out, gen


def local_sq_norm(named_tensors, tp_rank: int) -> torch.Tensor:
    """Sum of squares of the elements this rank counts in a TP-global norm by the
    parameters' marks: replicated (`tp_replicated`) only on tp rank 0, shared KV rows
    (`tp_duplicate_range`) only on their first sharer. `named_tensors` are (param, tensor)
    pairs, e.g. (p, p.grad). Summed over the TP group it must equal the full model's."""
    total = torch.zeros((), dtype=torch.float64)
    for p, t in named_tensors:
        if getattr(p, "tp_replicated", False) and tp_rank != 0:
            continue
        flat = t.detach().reshape(-1).double()
        sq = flat.pow(2).sum()
        dup = getattr(p, "tp_duplicate_range", None)
        if dup is not None:
            sq = sq - flat[dup[0]:dup[1]].pow(2).sum()
        total += sq.cpu()
    return total


# ---- workers --------------------------------------------------------------------------

def _train_case(rank, name):
    overrides, sp = CASES[name]
    cfg = config(**overrides)
    model = parallelize(build(cfg), dist.group.WORLD, sequence_parallel=sp)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    torch.manual_seed(1234)  # the same default stream as the reference on every TP rank
    out = []
    for step in range(STEPS):
        loss = train_step(model, opt, step)
        named = list(model.named_parameters())
        grads = gather_full_tensors([(n, p.grad) for n, p in named], cfg, dist.group.WORLD)
        sq = local_sq_norm([(p, p.grad) for _, p in named], rank)
        dist.all_reduce(sq)
        losses = [None] * dist.get_world_size()
        dist.all_gather_object(losses, loss)
        opt.step()
        params = gather_full_state_dict(model, dist.group.WORLD)
        out.append(dict(loss=loss, rank_losses=losses, grads=numpy_dict(grads),
                        grad_sq_norm=float(sq), params=numpy_dict(params)))
    model.eval()
    gen = None
    if not sp:  # generation runs on a plain TP model (decoding steps are 1 token long)
        gen = generate(model, PROMPTS, max_new_tokens=5, eos_id=EOP, pad_id=PAD, sop_id=SOP)
    return out, gen


def _sp_dropout_case(rank):
    """Sequence-parallel dropout draws from the per-rank tracker stream only. The input's
    two halves are the same tokens, so both ranks' embedding shards are equal before
    dropout: their masks must still differ, and the default generator (the replicated
    stream) must be untouched."""
    model = parallelize(build(config(hidden_dropout=0.5)), dist.group.WORLD,
                        sequence_parallel=True)
    mb = batches(0)[0]
    half = SEQ // 2
    mb["input_ids"][:, half:] = mb["input_ids"][:, :half]
    seen = []
    model.layers["0"].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    default_before = torch.get_rng_state()
    tracker_before = model.tp_rng.state_dict()["tensor-parallel"]
    loss = model(**{k: v for k, v in mb.items() if k != "labels"}, labels=mb["labels"]).sum()
    loss.backward()
    shards = [torch.empty_like(seen[0]) for _ in range(2)]
    dist.all_gather(shards, seen[0].contiguous())  # post-dropout embedding [s/2, b, h] each
    losses = [None] * dist.get_world_size()
    dist.all_gather_object(losses, loss.item())
    kept = (shards[0] != 0) & (shards[1] != 0)
    return dict(default_unchanged=torch.equal(default_before, torch.get_rng_state()),
                tracker_advanced=not torch.equal(tracker_before,
                                                 model.tp_rng.state_dict()["tensor-parallel"]),
                losses=losses, shard_shape=tuple(seen[0].shape),
                masks_differ=not torch.equal(shards[0] == 0, shards[1] == 0),
                kept_equal=torch.equal(shards[0][kept], shards[1][kept]),
                dropped_fraction=float((shards[0] == 0).float().mean()))


def _checkpoint_case(rank, world):
    """A full checkpoint loads into the TP layout (shard_state_dict) and reads back whole
    (gather_full_state_dict) under the full names and shapes."""
    cfg = config(multi_query_group_num=1)
    full = build(cfg).state_dict()
    model = parallelize(GLM.build(cfg, seed=5), dist.group.WORLD)
    model.load_state_dict(shard_state_dict(full, rank, world, cfg))
    back = gather_full_state_dict(model, dist.group.WORLD)
    try:
        parallelize(model, dist.group.WORLD)
        again = ""
    except ValueError as e:
        again = str(e)
    return dict(names_equal=sorted(back) == sorted(full), again=again,
                equal=all(torch.equal(back[n], full[n]) for n in full))


def _tp_worker(rank, world, names):
    out = {name: _train_case(rank, name) for name in names}
    out["checkpoint"] = _checkpoint_case(rank, world)
    if world == 2:
        out["sp dropout"] = _sp_dropout_case(rank)
    return out if rank == 0 else None


@functools.lru_cache(maxsize=None)
def run(world: int):
    names = tuple(n for n in CASES if n.startswith(f"tp{world} "))
    return run_workers(_tp_worker, world, names, timeout=150, pg_timeout=60)[0]


# ---- checks ---------------------------------------------------------------------------

def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check_case(world: int, name: str):
    got, got_gen = run(world)[name]
    ref, ref_gen = reference(name)
    worst = {"loss": 0.0, "grads": 0.0, "params": 0.0}
    for step, (g, r) in enumerate(zip(got, ref)):
        assert len(set(g["rank_losses"])) == 1, f"{name} step {step}: ranks disagree"
        worst["loss"] = max(worst["loss"], rel_err(g["loss"], r["loss"]))
        assert set(g["grads"]) == set(r["grads"])
        for key in ("grads", "params"):
            for pname, ref_t in r[key].items():
                assert g[key][pname].shape == ref_t.shape, (name, key, pname)
                err = rel_err(g[key][pname], ref_t)
                assert err <= RTOL, f"{name} step {step} {key} {pname}: rel err {err:.2e}"
                worst[key] = max(worst[key], err)
        # the replicated / shared-KV bookkeeping counts every element once
        assert rel_err(g["grad_sq_norm"], r["grad_sq_norm"]) <= RTOL, name
    assert worst["loss"] <= RTOL, f"{name}: loss rel err {worst['loss']:.2e}"
    if got_gen is not None:
        assert got_gen == ref_gen, f"{name}: TP greedy decoding {got_gen} != {ref_gen}"
    print(f"{name}: worst relative error {worst}")


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("tp2")])
def test_tp2_matches_single_process(name):
    check_case(2, name)


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("tp4")])
def test_tp4_gqa_shared_kv_groups_match_single_process(name):
    check_case(4, name)


def test_sequence_parallel_dropout_uses_the_per_rank_stream():
    res = run(2)["sp dropout"]
    assert res["shard_shape"] == (SEQ // 2, BATCH, 64)
    assert res["default_unchanged"], "SP dropout consumed the replicated (default) stream"
    assert res["tracker_advanced"], "SP dropout did not draw from the TP tracker"
    assert 0.4 < res["dropped_fraction"] < 0.6, res["dropped_fraction"]
    assert res["masks_differ"], "both sequence shards got the same dropout mask"
    assert res["kept_equal"], "equal embedding shards differ where neither was dropped"
    assert len(set(res["losses"])) == 1, res["losses"]


@pytest.mark.parametrize("world", [2, 4])
def test_full_checkpoint_loads_into_tp_layout_and_gathers_back(world):
    res = run(world)["checkpoint"]
    assert res["names_equal"] and res["equal"]
    assert "already tensor-parallel" in res["again"]
