"""parallel.layer_split: the ranges of each virtual stage (even == the old equal split,
explicit counts, the V's order), one-line config errors, the FLOP-balanced split, and
pp=2 runs with uneven splits (1F1B, ZB-H1, ZB-V) reproducing one process through the
Trainer, their checkpoint loading into the even split and into one process."""
import json
import os

import pytest
import torch

from dist import run_workers
from engine.config import ParallelConfig, build_run_config
from engine.parallel.split import layer_counts, layer_ranges, parse_layer_split
from engine.parallel.state import (ParallelDims, init_distributed, model_parallel_group,
                                   stage_layers)
from engine.pipeline.placement import Placement, VPlacement
from engine.train.layer_split import allocate, resolve_layer_split
from model import GLMConfig

pytestmark = pytest.mark.usefixtures("single_thread")


# ---- ranges ----------------------------------------------------------------------------

@pytest.mark.parametrize("layers, pp, vpp", [(8, 4, 1), (8, 2, 2), (12, 3, 2), (6, 2, 3)])
def test_even_ranges_are_the_equal_split(layers, pp, vpp):
    ranges = layer_ranges(layers, pp * vpp)
    for s in range(pp):
        for c in range(vpp):
            want = stage_layers(layers, pp, vpp, s, c)
            assert Placement(pp, vpp).layers(layers, s, c) == ranges[c * pp + s] == want


def test_explicit_ranges_and_the_v_order():
    assert layer_ranges(8, 2, "5,3") == [(0, 5), (5, 8)]
    assert [Placement(2, 1).layers(8, s, 0, (5, 3)) for s in range(2)] == [(0, 5), (5, 8)]
    # loop, pp=2 vpp=2: chunk c of stage s is virtual stage c * 2 + s
    loop = Placement(2, 2)
    assert [loop.layers(8, s, c, "3,2,2,1") for s in (0, 1) for c in (0, 1)] == \
        [(0, 3), (5, 7), (3, 5), (7, 8)]
    # the V: virtual 0..3 run down the ranks and back up, so stage 0 holds 0 and 3
    v = VPlacement(2)
    assert [v.layers(8, s, c, "2,3,2,1") for s in (0, 1) for c in (0, 1)] == \
        [(0, 2), (7, 8), (2, 5), (5, 7)]
    assert v.layers(8, 0, 0) == (0, 2) and v.layers(8, 0, 1) == (6, 8)   # even as before


@pytest.mark.parametrize("value, message", [
    ("5;3", "parallel.layer_split='5;3' must be 'even', 'balanced' or comma-separated"),
    ("fast", "parallel.layer_split='fast' must be 'even', 'balanced'"),
    ("5,,3", "parallel.layer_split='5,,3' must be"),
    ("5,0,3", "parallel.layer_split='5,0,3': every virtual stage needs at least one layer"),
])
def test_config_rejects_bad_syntax_in_one_line(value, message):
    with pytest.raises(ValueError) as err:
        ParallelConfig(layer_split=value)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("split, layers, pp, vpp, message", [
    ("5,3", 8, 2, 2, "parallel.layer_split='5,3' has 2 entries; the layout has pp*vpp=4"),
    ("5,2", 8, 2, 1, "parallel.layer_split='5,2' sums to 7 layers; the model has "
                     "num_layers=8"),
    ("even", 7, 2, 1, "num_layers=7 is not divisible by pipeline stages pp*vpp=2"),
    ("balanced", 3, 2, 2, "num_layers=3 is fewer than the pipeline's pp*vpp=4"),
])
def test_layout_checks_against_the_model_in_one_line(split, layers, pp, vpp, message):
    dims = ParallelDims(pp=pp, vpp=vpp)
    with pytest.raises(ValueError) as err:
        dims.validate(pp, num_layers=layers, layer_split=split)
    assert message in str(err.value) and "\n" not in str(err.value)
    # launch's check (engine/train/launch.parallel_state) is this validate
    cfg = build_run_config({"model": {"preset": "tiny", "num_layers": layers},
                            "parallel": {"pp": pp, "vpp": vpp, "layer_split": split}})
    with pytest.raises(ValueError, match="layer"):
        resolve_layer_split(cfg.model, 16, pp, vpp, "1f1b", split)


def test_uneven_splits_need_no_divisibility():
    assert ParallelDims(pp=2).validate(2, num_layers=7, layer_split="4,3")
    assert ParallelDims(pp=2).validate(2, num_layers=7, layer_split="balanced")
    assert layer_counts(7, 2, "4,3") == (4, 3)


def test_startup_line_and_staged_teacher_follow_the_split(tmp_path):
    from types import SimpleNamespace

    from engine.recipe.compress.distill import DistillConfig
    from engine.recipe.compress.distill_run import check_teacher, teacher_layer_split
    from engine.train.build import layout_line
    cfg = build_run_config({"model": {"preset": "tiny", "num_layers": 8},
                            "parallel": {"pp": 2, "layer_split": "5,3"},
                            "train": {"out_dir": str(tmp_path)}})
    state = SimpleNamespace(distributed=True, dims=ParallelDims(pp=2, dp=1))
    assert layout_line(cfg, state) == "tp=1 pp=2 dp=1 vpp=1 schedule=1f1b layers 5,3"
    # the teacher gets the student's split (its own layers must fit explicit counts)
    assert teacher_layer_split(cfg.model, cfg, state) == (5, 3)
    with pytest.raises(ValueError) as err:
        check_teacher(GLMConfig.preset("tiny", num_layers=12), cfg, DistillConfig(), state)
    assert "parallel.layer_split='5,3' sums to 8 layers; the model has num_layers=12" in \
        str(err.value) and "\n" not in str(err.value)
    cfg.parallel.layer_split = "balanced"
    assert teacher_layer_split(GLMConfig.preset("tiny", num_layers=12), cfg, state) == (7, 5)


# ---- balanced --------------------------------------------------------------------------

def _small(layers=None, vocab=None):
    over = {k: v for k, v in (("num_layers", layers), ("padded_vocab_size", vocab)) if v}
    return GLMConfig.preset("small", **over)


def test_allocate_is_min_max_then_even_then_later():
    assert allocate(8, [0, 0], 10, 1) == [4, 4]
    assert allocate(8, [0, 16], 10, 1) == [5, 3]          # head = 1.6 layers
    assert allocate(7, [0, 0], 10, 1) == [3, 4]           # a tie: the later stage
    assert allocate(4, [0, 100], 10, 2) == [2, 2]         # the minimum holds


def test_balanced_split_moves_layers_off_the_head():
    # the FLOP counts (engine/train/flops.py): on the small preset a layer is 4.55 MFLOP
    # per token at seq 128; the head 6 h V: 12.6 MFLOP at its vocab 8192 (2.8 layers),
    # 3.1 MFLOP at the bench's 2048 (0.69 layers: the even split is already the best)
    assert resolve_layer_split(_small(), 128, 2, 1, "1f1b", "balanced") == (4, 2)
    assert resolve_layer_split(_small(8), 128, 2, 1, "1f1b", "balanced") == (5, 3)
    assert resolve_layer_split(_small(8), 128, 2, 1, "zb-h1", "balanced") == (5, 3)
    assert resolve_layer_split(_small(8, 2048), 128, 2, 1, "1f1b", "balanced") == (4, 4)
    # ZB-V: stage 0 holds the head's virtual stage 3 (and the free embedding's 0), so it
    # gets fewer layers, and of its own fewer on the head's chunk
    v = resolve_layer_split(_small(8), 128, 2, 2, "zb-v", "balanced")
    assert v == (2, 2, 3, 1) and v[0] + v[3] < v[1] + v[2]
    # interleaved: stage 1 holds virtual stages 1 and 3 (the head)
    assert resolve_layer_split(_small(8), 128, 2, 2, "interleaved", "balanced") == \
        (2, 2, 3, 1)
    assert resolve_layer_split(_small(8, 2048), 128, 2, 2, "zb-v", "balanced") == (2,) * 4


def test_balanced_equals_even_when_the_head_is_free(monkeypatch):
    import engine.train.layer_split as ls
    monkeypatch.setattr(ls, "head_flops_per_token", lambda cfg: 0.0)
    for layers, pp, vpp, schedule in ((8, 2, 1, "1f1b"), (8, 2, 2, "zb-v"),
                                      (12, 3, 2, "interleaved"), (16, 4, 1, "zb-h1")):
        cfg = _small(layers)
        assert resolve_layer_split(cfg, 128, pp, vpp, schedule, "balanced") == \
            layer_counts(layers, pp * vpp, "even")


def test_even_resolves_to_the_equal_counts():
    assert resolve_layer_split(_small(8), 128, 2, 2, "zb-v", "even") == (2, 2, 2, 2)
    assert resolve_layer_split(_small(8), 128, 2, 1, "1f1b", "6,2") == (6, 2)
    assert parse_layer_split(" balanced ") == "balanced"


def test_planner_counts_the_stages_layers():
    from engine.planner.devices import device_profile
    from engine.planner.layouts import Layout, PlanRequest, enumerate_layouts
    from engine.planner.memory import stage_layers as planner_stage_layers, stage_params
    from engine.planner.timing import predict_time
    base = dict(config="small", world_size=2, device_memory_gb=16, seq_len=128,
                global_batch=16, precision="fp32", kernels="torch")
    lay = Layout(1, 2, 1, 1, 2, 8, False, 0)
    even = PlanRequest(**base)
    split = PlanRequest(**base, layer_split="4,2")
    assert [planner_stage_layers(split, lay, s) for s in (0, 1)] == [4, 2]
    assert [planner_stage_layers(even, lay, s) for s in (0, 1)] == [3, 3]
    assert stage_params(split.config, lay, 0, 4) > stage_params(even.config, lay, 0)
    predict_time(split, lay, device_profile("h100"))
    # explicit counts for two virtual stages: only pp=2 x vpp=1 layouts
    assert {(x.pp, x.vpp) for x in enumerate_layouts(split)} == {(2, 1)}


# ---- parity through the Trainer --------------------------------------------------------

STEPS, LAYERS = 2, 8
LAYOUTS = {"1f1b 5,3": ("1f1b", "5,3"), "zb-h1 5,3": ("zb-h1", "5,3"),
           "zb-v 3,2,2,1": ("zb-v", "3,2,2,1")}


def _cfg(out_dir, schedule="1f1b", pp=1, split="even"):
    return build_run_config({
        "model": {"preset": "tiny", "num_layers": LAYERS},
        "parallel": {"pp": pp, "vpp": 2 if schedule == "zb-v" else 1, "schedule": schedule,
                     "layer_split": split},
        "train": {"steps": STEPS, "micro_batch_size": 2, "num_microbatches": 3,
                  "seq_len": 24, "warmup_steps": 1, "lr": 3e-3, "grad_clip": 0.5, "eps": 1e-4,
                  "eval_every": 0, "out_dir": out_dir}})


def _trainer(cfg, state=None):
    from engine.train.trainer import Trainer
    from test_trainer_parity import MixedBatches
    return Trainer.from_config(cfg, MixedBatches(), state=state, log=lambda *a: None,
                               mp_group=model_parallel_group(state) if state else None)


def _state(cfg):
    pc = cfg.parallel
    return init_distributed(ParallelDims(pp=pc.pp, vpp=pc.vpp), timeout=90,
                            num_layers=cfg.model.num_layers, layer_split=pc.layer_split)


def _worker(rank, world, tmp):
    from test_trainer_parity import manual_steps
    out = {}
    for name, (schedule, split) in LAYOUTS.items():
        cfg = _cfg(os.path.join(tmp, "runs"), schedule, pp=2, split=split)
        tr = _trainer(cfg, _state(cfg))
        out[name] = dict(steps=manual_steps(tr, STEPS),
                         layers=[c.layer_range for c in tr.chunks])
        if name == "1f1b 5,3":
            tr.save(os.path.join(tmp, "ckpt"))
    # the "5,3" checkpoint into the even split of the same pp
    cfg = _cfg(os.path.join(tmp, "runs"), "1f1b", pp=2)
    tr = _trainer(cfg, _state(cfg))
    tr.resume(os.path.join(tmp, "ckpt"))
    out["even from 5,3"] = dict(step=tr.step, layers=[c.layer_range for c in tr.chunks],
                                params={n: p.detach().clone()
                                        for n, p in tr.named_trained_parameters()})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from test_trainer_parity import manual_steps
    tmp = str(tmp_path_factory.mktemp("layer-split"))
    ref = manual_steps(_trainer(_cfg(os.path.join(tmp, "ref"))), STEPS)
    return tmp, ref, run_workers(_worker, 2, tmp, timeout=300, pg_timeout=120)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_uneven_split_matches_single_process(runs, name):
    from test_trainer_parity import _close, param_atol
    _, ref, ranks = runs
    counts = [int(n) for n in LAYOUTS[name][1].split(",")]
    want = {"1f1b 5,3": [[(0, 5)], [(5, 8)]], "zb-h1 5,3": [[(0, 5)], [(5, 8)]],
            "zb-v 3,2,2,1": [[(0, 3), (7, 8)], [(3, 5), (5, 7)]]}[name]
    assert [res[name]["layers"] for res in ranks] == want
    assert sum(counts) == LAYERS
    seen = set()
    for r, res in enumerate(ranks):
        for t, ((loss, norm, grads, params), (rl, rn, rg, rp)) in enumerate(
                zip(res[name]["steps"], ref)):
            assert abs(loss - rl) <= 1e-5 * abs(rl), (name, r, t, loss, rl)
            assert abs(norm - rn) <= 1e-5 * rn, (name, r, t, norm, rn)
            for n in grads:
                _close(grads[n], rg[n], f"{name} rank {r} step {t} grad {n}")
                _close(params[n], rp[n], f"{name} rank {r} step {t} param {n}",
                       param_atol(n))
            seen |= set(grads)
    assert seen == set(ref[0][2])


def test_a_checkpoint_loads_across_splits(runs):
    tmp, ref, ranks = runs
    ckpt = os.path.join(tmp, "ckpt")
    with open(os.path.join(ckpt, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["layout"]["layer_split"] == "5,3"
    final = {}
    for res in ranks:   # the "5,3" run's weights after its last step
        final.update(res["1f1b 5,3"]["steps"][-1][3])
    # pp=2 even: each stage loads its own 4 layers by name, bit for bit
    assert [res["even from 5,3"]["layers"] for res in ranks] == [[(0, 4)], [(4, 8)]]
    got = {}
    for res in ranks:
        assert res["even from 5,3"]["step"] == STEPS
        got.update(res["even from 5,3"]["params"])
    assert set(got) == set(final)
    for n in final:
        assert torch.equal(got[n], final[n]), n
    # one process: the whole model
    single = _trainer(_cfg(os.path.join(tmp, "single")))
    single.resume(ckpt)
    for n, p in single.named_trained_parameters():
        assert torch.equal(p.detach(), final[n]), n
