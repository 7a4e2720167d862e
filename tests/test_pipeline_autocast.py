"""Under bf16 autocast the pipeline's activations and gradients cross stages in bf16
(the compute dtype, half of fp32's bytes), and the pp=2 loss and gradients match the
single-process autocast run within bf16 tolerance; without autocast everything on the
wire stays fp32 (bitwise parity is test_pipeline_parity.py's)."""
import contextlib

import pytest
import torch
import torch.distributed as dist

from dist import run_workers
from engine.pipeline.p2p import P2P
from engine.parallel.state import ParallelDims, init_distributed
from engine.pipeline.schedules import StepContext, forward_backward
from engine.pipeline.stage import build_stage
from model import GLM, GLMConfig
from test_pipeline_parity import count_tokens, microbatches

M = 4


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _reference():
    model = GLM.build(GLMConfig.preset("tiny"), seed=0)
    mbs = microbatches(M, 0)
    n = count_tokens(mbs)
    loss = forward_backward(StepContext("none", [model], mbs, n, autocast=_bf16))
    return loss, {k: p.grad.clone() for k, p in model.named_parameters()}


def _worker(rank, world):
    torch.set_num_threads(1)
    sent: list = []
    real = dist.batch_isend_irecv

    def spy(ops):
        sent.extend((op.op.__name__, op.tensor.dtype) for op in ops
                    if op.tensor.is_floating_point())
        return real(ops)

    dist.batch_isend_irecv = spy
    cfg = GLMConfig.preset("tiny")
    state = init_distributed(ParallelDims(pp=2), timeout=30, num_layers=cfg.num_layers)
    out = {}
    for name, autocast, wire in (("bf16", _bf16, torch.bfloat16), ("fp32", None, None)):
        sent.clear()
        chunks = build_stage(cfg, 2, 1, state.stage, seed=0)
        mbs = microbatches(M, 0)
        comm = P2P(state, cfg.hidden_size, timeout=30, wire_dtype=wire)
        loss = forward_backward(StepContext("1f1b", chunks, mbs, count_tokens(mbs), comm,
                                            state, autocast=autocast or contextlib.nullcontext))
        out[name] = {"loss": loss, "sent": sorted(set(sent)), "n_sent": len(sent),
                     "grads": {k: p.grad.clone() for c in chunks
                               for k, p in c.named_parameters()}}
    return out


@pytest.fixture(scope="module")
def runs():
    return _reference(), run_workers(_worker, 2, timeout=120)


def test_autocast_pipeline_sends_bf16_and_matches_single_process(runs):
    (ref_loss, ref_grads), results = runs
    for rank, res in enumerate(results):
        r = res["bf16"]
        assert r["n_sent"] > 0
        # every floating-point buffer posted, sends and receives, is bf16
        assert {dtype for _, dtype in r["sent"]} == {torch.bfloat16}, (rank, r["sent"])
        assert r["loss"] == pytest.approx(ref_loss, rel=2e-2)
        for k, g in r["grads"].items():
            ref = ref_grads[k]
            err = (g - ref).norm() / ref.norm().clamp_min(1e-12)
            assert err < 5e-2, (rank, k, float(err))


def test_fp32_pipeline_stays_fp32_on_the_wire(runs):
    _, results = runs
    for res in results:
        assert {dtype for _, dtype in res["fp32"]["sent"]} == {torch.float32}
    assert results[0]["fp32"]["loss"] == results[1]["fp32"]["loss"]
    assert results[0]["fp32"]["loss"] != results[0]["bf16"]["loss"]   # autocast did act
