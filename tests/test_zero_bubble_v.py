"""ZB-V on gloo: two chunks per rank in a V (chunk 0 of rank s = virtual stage s, chunk 1
= 2p - 1 - s; the loss on rank 0, the turn on rank p - 1 a local hand-off) reproduces the
single process (losses, gradients, updated parameters) for pp=2, pp=4 and pp=2 x dp=2,
forward-only included; the executor holds what the simulator says it holds."""

import pytest
import torch
import torch.distributed as dist

from dist import run_workers
from engine.pipeline.p2p import P2P
from engine.pipeline.placement import VPlacement
from engine.parallel.state import ParallelDims, init_distributed
from engine.pipeline.schedules import StepContext, forward_backward
from engine.pipeline.stage import build_stage
from engine.pipeline.stats import ScheduleStats
from engine.pipeline.sim import simulate_schedule
from test_pipeline_parity import (RTOL, Counter, assert_rel, config, count_tokens, make_opt,
                                  microbatches, numpy_dict, reference)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(state, layers, m, steps, dp_offset=0, dp_m=None):
    cfg = config(layers)
    chunks = build_stage(cfg, state.dims.pp, 2, state.stage, seed=0, schedule="zb-v")
    opt = make_opt([p for c in chunks for p in c.parameters()])
    comm = P2P(state, cfg.hidden_size, timeout=30)
    out = []
    for step in range(steps):
        global_mbs = microbatches(m, step)
        mine = global_mbs[dp_offset:dp_offset + (dp_m or m)]
        opt.zero_grad(set_to_none=True)
        stats, no_sync = ScheduleStats(), Counter()
        loss = forward_backward(StepContext("zb-v", chunks, mine, count_tokens(global_mbs), comm,
                                            state, no_sync=no_sync, stats=stats))
        if state.dims.dp > 1:
            for c in chunks:
                for p in c.parameters():
                    dist.all_reduce(p.grad, group=state.dp_group)
        grads = numpy_dict((n, p.grad) for c in chunks for n, p in c.named_parameters())
        opt.step()
        out.append(dict(loss=loss, grads=grads, peak=stats.peak_in_flight,
                        no_sync=no_sync.n, freed=stats.outputs_freed,
                        layers=[c.layer_range for c in chunks],
                        ends=[(c.pre_process, c.post_process) for c in chunks],
                        params=numpy_dict(n_p for c in chunks for n_p in c.named_parameters())))
    return out


def _forward_only(state, layers, m):
    cfg = config(layers)
    chunks = build_stage(cfg, state.dims.pp, 2, state.stage, seed=0, schedule="zb-v")
    outputs = []
    loss = forward_backward(StepContext("zb-v", chunks, microbatches(m, 0),
                                        count_tokens(microbatches(m, 0)),
                                        P2P(state, cfg.hidden_size, timeout=30), state,
                                        forward_only=True, outputs=outputs))
    assert all(p.grad is None for c in chunks for p in c.parameters())
    return dict(loss=loss, per_mb=[o.numpy() for o in outputs])


def _pp2_worker(rank, world):
    state = init_distributed(ParallelDims(pp=2, vpp=2), timeout=30, num_layers=4)
    return {"m4": _train(state, 4, m=4, steps=2), "m1": _train(state, 4, m=1, steps=1),
            "forward-only": _forward_only(state, 4, m=3)}


def _pp4_worker(rank, world):
    out = {}
    state = init_distributed(ParallelDims(pp=4, vpp=2), timeout=30, num_layers=8)
    out["pp4"] = _train(state, 8, m=7, steps=2)
    out["pp4 m<p"] = _train(state, 8, m=2, steps=1)
    state = init_distributed(ParallelDims(pp=2, dp=2, vpp=2), timeout=30, num_layers=4)
    out["pp2 dp2"] = _train(state, 4, m=4, steps=2, dp_offset=2 * state.coords.dp, dp_m=2)
    out["pp2 dp2 coords"] = (state.coords.pp, state.coords.dp)
    return out


@pytest.fixture(scope="module")
def pp2():
    return run_workers(_pp2_worker, 2, timeout=120)


@pytest.fixture(scope="module")
def pp4():
    return run_workers(_pp4_worker, 4, timeout=180)


def check(results, key, ref, coords=None):
    names = set()
    for rank, res in enumerate(results):
        for step, (got, want) in enumerate(zip(res[key], ref)):
            assert got["loss"] == pytest.approx(want["loss"], rel=RTOL), (key, rank, step)
            for n, g in got["grads"].items():
                assert_rel(g, want["grads"][n], f"{key} rank {rank} step {step} grad {n}")
            for n, p in got["params"].items():
                assert_rel(p, want["params"][n], f"{key} rank {rank} step {step} param {n}")
            names |= set(got["params"])
    assert names == set(ref[0]["params"]), "the ranks together must hold every parameter"


def test_pp2_parity_and_the_v(pp2):
    check(pp2, "m4", reference(4, 2, layers=4))
    check(pp2, "m1", reference(1, 1, layers=4))
    # the V: rank 0 holds layers 0 and 3 (embedding and head), rank 1 layers 1 and 2
    assert [r["m4"][0]["layers"] for r in pp2] == [[(0, 1), (3, 4)], [(1, 2), (2, 3)]]
    assert [r["m4"][0]["ends"] for r in pp2] == [[(True, False), (False, True)],
                                                [(False, False), (False, False)]]


def test_pp2_holds_what_the_simulator_says_and_syncs_once_per_chunk(pp2):
    sim = simulate_schedule("zb-v", 2, 4, 2)
    for s, res in enumerate(pp2):
        assert res["m4"][0]["peak"] == sim.peak_in_flight[s]
        # split backward, two chunks: the reduction rides on each chunk's last B and W
        assert res["m4"][0]["no_sync"] == 2 * (2 * 4) - 4
    # sent outputs lose their .data; the turn's output too (handed over in place)
    assert pp2[0]["m4"][0]["freed"] == 4      # chunk 0 (chunk 1 computes the loss)
    assert pp2[1]["m4"][0]["freed"] == 4      # chunk 1 (chunk 0's output stays local)


def test_pp2_forward_only(pp2):
    ref = reference(3, 1, layers=4)[0]
    for res in pp2:
        assert res["forward-only"]["loss"] == pytest.approx(ref["loss"], rel=RTOL)
    # the loss and the outputs are on rank 0, the bottom of the V
    assert len(pp2[0]["forward-only"]["per_mb"]) == 3 and pp2[1]["forward-only"]["per_mb"] == []
    for got, want in zip(pp2[0]["forward-only"]["per_mb"], ref["per_mb"]):
        assert_rel(got, want, "zb-v forward-only")


def test_pp4_parity(pp4):
    check(pp4, "pp4", reference(7, 2, layers=8))
    check(pp4, "pp4 m<p", reference(2, 1, layers=8))
    place = VPlacement(4)
    for s, res in enumerate(pp4):
        assert res["pp4"][0]["layers"] == [place.layers(8, s, 0), place.layers(8, s, 1)]
        assert res["pp4"][0]["peak"] == simulate_schedule("zb-v", 4, 7, 2).peak_in_flight[s]


def test_pp2_dp2_parity(pp4):
    ref = reference(4, 2, dp=2, layers=4)
    for rank, res in enumerate(pp4):
        assert res["pp2 dp2 coords"] == (rank // 2, rank % 2)
    check(pp4, "pp2 dp2", ref)
