"""The zero-bubble split backward beyond fp32 / tp=1: tensor-parallel layers defer their
weight gradients to W (column and row, with and without sequence parallelism; a GQA
replica stays on the plain path), B then W equals one plain backward under CPU bf16
autocast and under fp16 loss scaling, zb-h1 and zb-v at tp=2 x pp=2 (recompute and
sequence parallelism included) reproduce one process through the Trainer with the TP
layers' W actually deferred, zb-v under bf16 autocast equals the other schedules under
the same autocast, and distillation under zb-v (the head on stage 0) reproduces the
single-process distillation."""
import os

import pytest
import torch
import torch.nn.functional as F

from dist import run_workers
from engine.config import build_run_config
from engine.parallel.state import ParallelDims, init_distributed, model_parallel_group
from engine.pipeline.split_backward import WeightGradStore, install, store_for
from model import GLM, GLMConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def _exact(got, want, what):
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=what)


# ---- (a) one TP layer: B then W == one plain backward ----------------------------------

S, B, H, LOCAL = 4, 2, 8, 6


def _layer(kind, group, sp, replica=None):
    from engine.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    g = torch.Generator().manual_seed(7)
    if kind == "column":
        layer = ColumnParallelLinear(H, LOCAL, True, group, sequence_parallel=sp,
                                     replica=replica)
    else:
        layer = RowParallelLinear(LOCAL, H, True, group, sequence_parallel=sp)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return layer


def _layer_case(state, kind, sp, replica=None):
    """Gradients of X, W and b from a plain backward and from B then W, and what B left
    for W (None where nothing may be deferred)."""
    rank, tp = state.coords.tp, state.dims.tp
    # the column layer's input is replicated (one seed) or, under SP, this rank's
    # sequence shard; the row layer's is this rank's feature shard
    seed = rank if (kind == "row" or sp) else 0
    g = torch.Generator().manual_seed(100 + seed)
    in_shape = (S // tp if sp else S, B, H) if kind == "column" else (S, B, LOCAL)
    x0 = torch.randn(in_shape, generator=g)
    out = {}
    for mode in ("plain", "split"):
        layer = _layer(kind, state.tp_group, sp, replica)
        x = x0.clone().requires_grad_(True)
        if mode == "split":
            store = WeightGradStore()
            routed = install(layer, store)
            with store.backward_of(0):
                y = layer(x)
                dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5 + rank))
                y.backward(dy)
            out["routed"] = routed
            out["after B"] = {"weight": layer.weight.grad is not None,
                              "bias": layer.bias.grad is not None,
                              "held": len(store),
                              # (rows, features): a product without a bias holds its
                              # input folded to 2-D, as F.linear multiplies it
                              "held x": [(x_.numel() // x_.shape[-1], x_.shape[-1])
                                         for _, _, x_, _ in store.pending[0]]}
            store.run(0)
            out["after W"] = len(store)
        else:
            y = layer(x)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5 + rank))
            y.backward(dy)
        out[mode] = {"x": x.grad, "weight": layer.weight.grad, "bias": layer.bias.grad}
    return out


def _layers_worker(rank, world):
    state = init_distributed(ParallelDims(tp=2), timeout=30)
    out = {(kind, sp): _layer_case(state, kind, sp)
           for kind in ("column", "row") for sp in (False, True)}
    # GQA KV rows [2, 6) shared by both ranks (one slot): the plain path
    out["replica"] = _layer_case(state, "column", False, replica=(2, 0, 1))
    return out


@pytest.fixture(scope="module")
def tp_layers():
    return run_workers(_layers_worker, 2, timeout=90)


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("sp", [False, True])
def test_tp_layer_b_then_w_equals_one_backward(tp_layers, kind, sp):
    for rank, res in enumerate(tp_layers):
        r = res[(kind, sp)]
        assert r["routed"] == 1
        # B: no weight gradient yet, one (X, dY) pair held; the column bias waits for W
        # with its weight, the row bias (added after the reduction) is done in B
        assert r["after B"]["weight"] is False and r["after B"]["held"] == 1
        assert r["after B"]["bias"] is (kind == "row")
        # the X held is what the weight multiplies: for the column layer under SP the
        # all-gathered full sequence, not the [s/tp, b, h] input shard
        assert r["after B"]["held x"] == [(S * B, H) if kind == "column" else (S * B, LOCAL)]
        assert r["after W"] == 0
        for name in ("x", "weight", "bias"):
            _exact(r["split"][name], r["plain"][name], f"{kind} sp={sp} rank {rank} {name}")


def test_replicated_kv_column_layer_stays_plain(tp_layers):
    for res in tp_layers:
        r = res["replica"]
        assert r["routed"] == 0
        assert r["after B"] == {"weight": True, "bias": True, "held": 0, "held x": []}
        for name in ("x", "weight", "bias"):
            _exact(r["split"][name], r["plain"][name], f"replica {name}")


# ---- (2) mixed precision: B then W == one plain backward -------------------------------

def _ids():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(5, 500, (2, 16), generator=g),
            torch.randint(5, 500, (2, 16), generator=g))


def _split_vs_plain(model_fn, loss_fn, context):
    ids, labels = _ids()
    ref, model = model_fn(), model_fn()
    for _ in range(2):   # two microbatches: accumulation into .grad as well
        with context():
            loss = loss_fn(ref(ids, labels=labels))
        loss.backward()
    store = store_for(model)
    for mb in range(2):
        with context(), store.deferring():   # F, as the executor runs it
            loss = loss_fn(model(ids, labels=labels))
        with store.backward_of(mb):
            loss.backward()
    stashed = {x.dtype for pairs in store.pending.values() for _, _, x, _ in pairs}
    stashed |= {dy.dtype for pairs in store.pending.values() for _, _, _, dy in pairs}
    assert len(store) >= 2 * 4 * model.config.num_layers
    store.run(0)
    store.run(1)
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        assert b.grad.dtype == b.dtype, n    # accumulated in the parameter's dtype
        _exact(b.grad, a.grad, n)
    return stashed


def test_split_backward_under_bf16_autocast_equals_plain_autocast_backward():
    cfg = GLMConfig.preset("tiny")
    stashed = _split_vs_plain(lambda: GLM.build(cfg, seed=0), lambda t: t.sum() / 32,
                              lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert stashed == {torch.bfloat16}   # X and dY held in the compute dtype, half the bytes


def test_split_backward_with_fp16_loss_scaling_carries_the_scale():
    # fp16 parameters, loss x 2^12 (the scaler's root multiplication): W's gradients are
    # the scaled ones, accumulated in fp16, as a plain backward's
    cfg = GLMConfig.preset("tiny", kernels="torch")
    stashed = _split_vs_plain(lambda: GLM.build(cfg, seed=0).half(),
                              lambda t: t.float().sum() / 32 * 4096.0,
                              lambda: torch.autocast("cpu", enabled=False))
    assert stashed == {torch.float16}


# ---- (b, c) zb-h1 / zb-v at tp=2 x pp=2 through the Trainer ----------------------------

STEPS, GLOBAL_MB = 2, 4


def _run_cfg(schedule="1f1b", tp=1, pp=1, sp=False, recompute=False):
    cfg = build_run_config({
        "model": {"preset": "tiny"},
        "parallel": {"tp": tp, "pp": pp, "sequence_parallel": sp, "schedule": schedule},
        "train": {"steps": STEPS, "micro_batch_size": 2, "num_microbatches": GLOBAL_MB,
                  "seq_len": 24, "warmup_steps": 1, "lr": 3e-3, "grad_clip": 0.5, "eps": 1e-4,
                  "recompute": recompute, "eval_every": 0,
                  "out_dir": "/tmp/unused-zb-layouts"}})
    if schedule == "zb-v":
        cfg.parallel.vpp = 2
    return cfg


def _watch_w(chunks):
    """Wrap each chunk's store so that every W op records which parameters it found
    held for its microbatch: proof that B left them for W. -> (held counts, the names of
    the TP layers' parameters that should be there)."""
    from engine.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    held, want = {}, set()
    for chunk in chunks:
        names = {id(p): n for n, p in chunk.named_parameters()}
        for mod_name, mod in chunk.named_modules():
            if isinstance(mod, RowParallelLinear) or (
                    isinstance(mod, ColumnParallelLinear) and mod.replica is None):
                want.add(f"{mod_name}.weight")
                if isinstance(mod, ColumnParallelLinear) and mod.bias is not None:
                    want.add(f"{mod_name}.bias")
        store = store_for(chunk)   # the executor's (installed once per chunk)
        real = store.run

        def run(key, _real=real, _store=store, _names=names):
            for w, b, _, _ in _store.pending.get(key, []):
                for p in (w, b):
                    if p is not None:
                        held[_names[id(p)]] = held.get(_names[id(p)], 0) + 1
            _real(key)
        store.run = run
    return held, want


def _trainer_worker(rank, world, layouts):
    from engine.tensor_parallel import gather_full_tensors
    from engine.train.trainer import Trainer
    from test_trainer_parity import MixedBatches, manual_steps
    out = {}
    for name, layout in layouts.items():
        cfg = _run_cfg(**layout)
        pc = cfg.parallel
        state = init_distributed(ParallelDims(tp=pc.tp, pp=pc.pp, vpp=pc.vpp), timeout=90,
                                 num_layers=cfg.model.num_layers)
        tr = Trainer.from_config(cfg, MixedBatches(), state=state, log=lambda *a: None,
                                 mp_group=model_parallel_group(state))
        held, want = _watch_w(tr.chunks)

        def gather(named, _cfg=cfg, _state=state):
            return gather_full_tensors(named, _cfg.model, _state.tp_group)

        out[name] = dict(steps=manual_steps(tr, steps=STEPS, gather=gather), held=held,
                         want=sorted(want))
    return out


TRAINER_LAYOUTS = {
    "zb-h1 tp2 pp2": dict(schedule="zb-h1", tp=2, pp=2),
    "zb-v tp2 pp2 sp": dict(schedule="zb-v", tp=2, pp=2, sp=True),
    "zb-h1 tp2 pp2 sp recompute": dict(schedule="zb-h1", tp=2, pp=2, sp=True, recompute=True),
    "zb-v tp2 pp2 recompute": dict(schedule="zb-v", tp=2, pp=2, recompute=True),
}
# the same layouts under 1F1B (no split backward): the zero-bubble runs must give the
# same bits; SP changes the op order, recompute does not
BASELINES = {"1f1b tp2 pp2": dict(schedule="1f1b", tp=2, pp=2),
             "1f1b tp2 pp2 sp": dict(schedule="1f1b", tp=2, pp=2, sp=True)}

# Against one process the parameters get test_trainer_parity.param_atol's floor on the qkv
# bias (its key part has a zero gradient; the rounding noise becomes Adam updates). The
# bitwise comparison with 1F1B in the same layout below is the check on the split backward.


@pytest.fixture(scope="module")
def trainer_runs():
    from engine.train.trainer import Trainer
    from test_trainer_parity import MixedBatches, manual_steps
    ref = manual_steps(Trainer.from_config(_run_cfg(), MixedBatches(), log=lambda *a: None),
                       steps=STEPS)
    ranks = run_workers(_trainer_worker, 4, {**TRAINER_LAYOUTS, **BASELINES}, timeout=420,
                        pg_timeout=120)
    return ref, ranks


def _union(ranks, name, t, k):
    """{parameter name: full tensor} of step t over all ranks (k: 2 grads, 3 params)."""
    out = {}
    for res in ranks:
        out.update(res[name]["steps"][t][k])
    return out


@pytest.mark.parametrize("name", list(TRAINER_LAYOUTS))
def test_zero_bubble_tp2_pp2_matches_single_process(trainer_runs, name):
    from test_trainer_parity import _close, param_atol
    ref, ranks = trainer_runs
    seen = set()
    for r, res in enumerate(ranks):
        got = res[name]
        for t, ((loss, norm, grads, params), (rl, rn, rg, rp)) in enumerate(
                zip(got["steps"], ref)):
            assert abs(loss - rl) <= 1e-5 * abs(rl), (name, r, t, loss, rl)
            assert abs(norm - rn) <= 1e-5 * rn, (name, r, t, norm, rn)
            for n in grads:
                assert grads[n].shape == rg[n].shape, (n, grads[n].shape, rg[n].shape)
                _close(grads[n], rg[n], f"{name} rank {r} step {t} grad {n}")
                _close(params[n], rp[n], f"{name} rank {r} step {t} param {n}", param_atol(n))
            seen |= set(grads)
        # every TP projection of this rank (qkv, dense, gate_up, down of each layer it
        # holds) was held from its B to its W, once per microbatch and step; nothing else
        # (norms, embedding, head) is deferred
        want = set(got["want"])
        layers = {n.split(".")[1] for n in want}
        assert {n.rsplit(".", 2)[-2] for n in want if n.endswith("weight")} == \
            {"qkv", "dense", "gate_up", "down"}, want
        assert len([n for n in want if n.endswith("weight")]) == 4 * len(layers)
        assert got["held"] == {n: GLOBAL_MB * STEPS for n in want}, (name, r, got["held"])
    assert seen == set(ref[0][2])


@pytest.mark.parametrize("name", list(TRAINER_LAYOUTS))
def test_zero_bubble_tp2_pp2_equals_one_f_one_b_bitwise(trainer_runs, name):
    _, ranks = trainer_runs
    base = "1f1b tp2 pp2 sp" if TRAINER_LAYOUTS[name].get("sp") else "1f1b tp2 pp2"
    v = TRAINER_LAYOUTS[name]["schedule"] == "zb-v"
    for t in range(STEPS):
        for r, res in enumerate(ranks):
            assert res[name]["steps"][t][0] == res[base]["steps"][t][0], (name, r, t)
            # the V puts other layers on each stage: the global norm adds its per-stage
            # sums of squares in another grouping (last bits)
            got_norm, want_norm = res[name]["steps"][t][1], res[base]["steps"][t][1]
            assert (abs(got_norm - want_norm) <= 1e-6 * want_norm if v
                    else got_norm == want_norm), (name, r, t)
        for k, what in ((2, "grad"), (3, "param")):
            got, want = _union(ranks, name, t, k), _union(ranks, base, t, k)
            assert set(got) == set(want)
            for n in want:
                if k == 3 and v:   # through the clip coefficient of that norm
                    torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-9,
                                               msg=f"{name} step {t} {what} {n}")
                else:
                    _exact(got[n], want[n], f"{name} step {t} {what} {n}")


# ---- (d) zb-v under bf16 autocast == the other schedules under the same autocast -------

AC_MB = 4


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _autocast_worker(rank, world):
    from engine.pipeline.p2p import P2P
    from engine.pipeline.schedules import StepContext, forward_backward
    from engine.pipeline.stage import build_stage
    from test_pipeline_parity import count_tokens, microbatches
    cfg = GLMConfig.preset("tiny")
    out = {}
    for name, schedule, vpp, wire in (("1f1b", "1f1b", 1, None),
                                      ("interleaved", "interleaved", 2, None),
                                      ("zb-v", "zb-v", 2, None),
                                      ("zb-v bf16 wire", "zb-v", 2, torch.bfloat16)):
        state = init_distributed(ParallelDims(pp=2, vpp=vpp), timeout=30,
                                 num_layers=cfg.num_layers)
        chunks = build_stage(cfg, 2, vpp, state.stage, seed=0, schedule=schedule)
        mbs = microbatches(AC_MB, 0)
        comm = P2P(state, cfg.hidden_size, timeout=30, wire_dtype=wire)
        held = []
        if schedule == "zb-v":
            for c in chunks:
                store = store_for(c)
                real = store.run

                def run(key, _real=real, _store=store):
                    held.append(len(_store.pending.get(key, [])))
                    _real(key)
                store.run = run
        loss = forward_backward(StepContext(schedule, chunks, mbs, count_tokens(mbs), comm,
                                            state, autocast=_bf16))
        out[name] = {"loss": loss, "held": held,
                     "grads": {k: p.grad.clone() for c in chunks
                               for k, p in c.named_parameters()}}
    return out


@pytest.fixture(scope="module")
def autocast_runs():
    from engine.pipeline.schedules import StepContext, forward_backward
    from test_pipeline_parity import count_tokens, microbatches
    model = GLM.build(GLMConfig.preset("tiny"), seed=0)
    mbs = microbatches(AC_MB, 0)
    loss = forward_backward(StepContext("none", [model], mbs, count_tokens(mbs),
                                        autocast=_bf16))
    ref = {"loss": loss, "grads": {k: p.grad.clone() for k, p in model.named_parameters()}}
    return ref, run_workers(_autocast_worker, 2, timeout=120)


def test_zb_v_under_bf16_autocast_equals_one_f_one_b_and_one_process(autocast_runs):
    ref, ranks = autocast_runs
    for rank, res in enumerate(ranks):
        zbv = res["zb-v"]
        # the linear layers' W did run deferred (2 chunks x 4 microbatches per rank)
        assert len(zbv["held"]) == 2 * AC_MB and min(zbv["held"]) >= 4, zbv["held"]
        # fp32 on the wire (the residual stream is fp32): every layout runs the same ops
        # on the same values, so the split backward must give the same bits
        for other in ("1f1b", "interleaved"):
            assert zbv["loss"] == res[other]["loss"] == ref["loss"], (rank, other)
        for k, g in zbv["grads"].items():
            _exact(g, ref["grads"][k], f"zb-v bf16 rank {rank} {k}")
            for other in ("1f1b", "interleaved"):
                if k in res[other]["grads"]:
                    _exact(g, res[other]["grads"][k], f"{other} rank {rank} {k}")
        # a bf16 wire (the Trainer's choice under autocast) rounds the activations: to
        # bf16 tolerance
        wired = res["zb-v bf16 wire"]
        assert wired["loss"] == pytest.approx(ref["loss"], rel=2e-2)
        for k, g in wired["grads"].items():
            err = (g - ref["grads"][k]).norm() / ref["grads"][k].norm().clamp_min(1e-12)
            assert err < 5e-2, (rank, k, float(err))


# ---- (e) distillation under zb-v: the head (and the loss) on stage 0 -------------------

def _kd_run(tmp_dir, state=None, layout="same", **kw):
    from engine.recipe.compress.distill_run import distill_trainer
    from test_distill import KD_STEPS, _kd_setup
    from test_trainer_parity import MixedBatches, manual_steps
    # the student keeps all 4 layers: the V needs num_layers divisible by 2 * pp
    teacher, _, dcfg, run, kept = _kd_setup(tmp_dir, layout=layout, layers=4, **kw)
    tr, loss_fn = distill_trainer(run, dcfg, MixedBatches(), teacher=teacher,
                                  kept_hidden=kept, state=state, log=lambda *a: None)
    steps = manual_steps(tr, KD_STEPS, extra=lambda t: t.log_terms())
    return steps, [(c.pre_process, c.post_process) for c in tr.chunks], \
        "proj" in tr.aux_modules


def _kd_worker(rank, world, tmp_dir):
    state = init_distributed(ParallelDims(pp=2, vpp=2), timeout=60, num_layers=4)
    return {layout: _kd_run(tmp_dir, state, layout, pp=2, schedule="zb-v")
            for layout in ("same", "last")}


def test_distillation_under_zb_v_matches_single_process(tmp_path):
    tmp = str(tmp_path)
    ref, _, _ = _kd_run(tmp)
    ranks = run_workers(_kd_worker, 2, tmp, timeout=240, pg_timeout=120)
    seen = set()
    for r, res in enumerate(ranks):
        for layout, (steps, ends, has_proj) in res.items():
            # the V: stage 0 holds the embedding (chunk 0) and the head (chunk 1), so the
            # loss, the teacher's outputs and the projection live there
            assert ends == ([(True, False), (False, True)] if r == 0 else
                            [(False, False), (False, False)]), (layout, r, ends)
            assert has_proj == (r == 0), (layout, r)
            for t, ((loss, norm, grads, params, terms), (rl, rn, rg, rp, rt)) in enumerate(
                    zip(steps, ref)):
                where = f"zb-v {layout} rank {r} step {t}"
                assert abs(loss - rl) <= 1e-5 * abs(rl), (where, loss, rl)
                assert abs(norm - rn) <= 1e-5 * rn, (where, norm, rn)
                assert set(terms) == set(rt) == {"ce", "kl", "hidden"}, (where, terms)
                for k in rt:   # every rank logs the job's per-term means
                    assert abs(terms[k] - rt[k]) <= 1e-5 * abs(rt[k]), (where, k)
                for n in grads:
                    scale = rg[n].abs().max().item()
                    assert (grads[n] - rg[n]).abs().max().item() <= 1e-5 * scale + 1e-9, \
                        (where, "grad", n)
                    assert (params[n] - rp[n]).abs().max().item() <= \
                        1e-5 * rp[n].abs().max().item() + 1e-9, (where, "param", n)
                seen |= set(grads)
    assert seen == set(ref[0][2])
