"""Failures end in clear errors, never hangs: a rank that raises, a rank killed outright,
a rank that stalls past the timeout, and layouts / inputs that cannot work."""
import os
import re
import time

import pytest
import torch

from dist import run_workers, spawn_workers
from engine.pipeline.p2p import P2P, Side
from engine.parallel.failures import PeerError
from engine.parallel.state import ParallelDims, init_distributed
from engine.pipeline.schedules import StepContext, forward_backward
from engine.pipeline.stage import build_stage, glm_forward_step
from model import GLMConfig
from test_pipeline_parity import count_tokens, microbatches

CFG = GLMConfig.preset("tiny")
CFG6 = GLMConfig.preset("tiny", num_layers=6)   # splits over 2 and 3 stages


def run_allowing_deaths(fn, world, *args, timeout=60.0, pg_timeout=30.0):
    """A worker that dies is a result here, not a failure: {rank: (ok, value)} of the
    ranks that reported, and every process's exit code."""
    return spawn_workers(fn, world, *args, timeout=timeout, pg_timeout=pg_timeout,
                         tolerate_deaths=True)


def _faulty_step(rank, world, mode, victim, p2p_timeout, hang_s=0.0):
    """One 1F1B step over pp=world; stage `victim` fails in its second forward."""
    state = init_distributed(ParallelDims(pp=world), timeout=30, num_layers=CFG6.num_layers)
    chunks = build_stage(CFG6, world, 1, state.stage, seed=0)
    mbs = microbatches(4, 0)

    def step(chunk, batch, hidden, side):
        if state.stage == victim and batch is mbs[1]:
            if mode == "raise":
                raise RuntimeError("injected failure in forward")
            if mode == "exit":
                os._exit(17)
            if mode == "hang":
                time.sleep(hang_s)
        return glm_forward_step(chunk, batch, hidden, side)

    # every rank ready before the clock starts: a slow start under load must not look
    # like a stalled peer to the short P2P timeout
    torch.distributed.barrier()
    started = time.monotonic()
    try:
        forward_backward(StepContext("1f1b", chunks, mbs, count_tokens(mbs),
                                     P2P(state, CFG6.hidden_size, timeout=p2p_timeout), state,
                                     forward_step=step))
        return ("ok", "", time.monotonic() - started)
    except Exception as err:  # noqa: BLE001 - the message is what the test checks
        return (type(err).__name__, str(err), time.monotonic() - started)


def test_rank_that_raises_is_named_by_every_other_rank():
    # pp=3, the last stage raises: stage 1 sees its neighbour go, stage 0 only sees
    # stage 1 go, yet both name rank 2 as where the failure started
    results = run_workers(_faulty_step, 3, "raise", 2, 20.0, timeout=90)
    kind, message, _ = results[2]
    assert kind == "RuntimeError" and "injected failure" in message
    for rank in (0, 1):
        kind, message, elapsed = results[rank]
        assert kind == PeerError.__name__, message
        assert message.startswith(f"rank {rank} (stage {rank}): ")
        assert "First failure in the job: rank 2 (stage 2) raised RuntimeError: injected " \
               "failure in forward" in message
        assert elapsed < 20.0
    assert "with rank 2 (stage 2) failed" in results[1][1]


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_rank_is_named(victim):
    # victim 0 also takes the rendezvous store down with it: the survivor must still
    # name it (from its own failed connection) and not hang on the store
    results, codes = run_allowing_deaths(_faulty_step, 2, "exit", victim, 20.0, timeout=60)
    assert codes[victim] == 17 and victim not in results
    survivor = 1 - victim
    ok, (kind, message, elapsed) = results[survivor]
    assert ok and kind == PeerError.__name__, message
    assert f"with rank {victim} (stage {victim}) failed" in message
    assert "connection closed: the peer process exited or crashed" in message
    assert elapsed < 20.0
    assert codes[survivor] == 0


def test_stalled_rank_times_out_with_its_name():
    # rank 1 stalls 5 s inside a forward; rank 0 gives up after its 1.5 s P2P timeout
    results = run_workers(_faulty_step, 2, "hang", 1, 1.5, 5.0, timeout=90)
    kind, message, _ = results[0]
    assert kind == PeerError.__name__, results
    assert message.startswith("rank 0 (stage 0): "), message
    assert "with rank 1 (stage 1) failed" in message and "no answer within 1.5s" in message
    waited = float(re.search(r"failed after (\d+\.\d)s", message).group(1))
    assert 1.4 <= waited < 4.0, message     # its own timeout, not the length of the stall
    # the stalled rank, when it wakes, finds rank 0 gone and fails too, instead of hanging
    kind, message, _ = results[1]
    assert kind == PeerError.__name__ and "with rank 0 (stage 0) failed" in message, results


def _bad_inputs(rank, world):
    errors = {}
    started = time.monotonic()
    for name, dims, layers in (("world", ParallelDims(pp=3), 4),
                               ("layers", ParallelDims(pp=2, vpp=4), 4)):
        try:
            init_distributed(dims, timeout=10, num_layers=layers)
        except ValueError as err:
            errors[name] = str(err)
    state = init_distributed(ParallelDims(pp=2, vpp=2), timeout=10, num_layers=4)
    chunks = build_stage(CFG, 2, 2, state.stage)
    comm = P2P(state, CFG.hidden_size, timeout=10)
    mbs = microbatches(4, 0)
    try:  # interleaving needs m to be a multiple of pp: every rank knows before any send
        forward_backward(StepContext("interleaved", chunks, mbs[:3], count_tokens(mbs), comm,
                                     state))
    except ValueError as err:
        errors["interleaved m"] = str(err)
    try:  # the stages disagree on the microbatch count: the handshake catches it
        forward_backward(StepContext("interleaved", chunks, mbs[:2] if rank == 0 else mbs,
                                     count_tokens(mbs), comm, state))
    except ValueError as err:
        errors["count"] = str(err)
    # a hidden state of the wrong shape is refused before anything is posted
    sharded = P2P(state, CFG.hidden_size, timeout=10, seq_shards=2)
    sharded.begin_step(mbs if state.is_first_stage else None, 4)
    try:
        full = torch.zeros(16, 2, CFG.hidden_size)
        sharded.post(send_next=(full, Side.from_batch(mbs[0], "cpu")))
    except ValueError as err:
        errors["shape"] = str(err)
    # nothing above broke the process group: a correct step still runs
    loss = forward_backward(StepContext("interleaved", chunks, mbs[:2], count_tokens(mbs[:2]),
                                        comm, state))
    return errors, loss, time.monotonic() - started


def test_impossible_layouts_and_inputs_fail_before_any_work():
    results = run_workers(_bad_inputs, 2, timeout=60)
    for errors, loss, elapsed in results:
        assert errors["world"] == "tp*pp*dp=3 does not equal world size 2"
        assert errors["layers"] == ("num_layers=4 is not divisible by pipeline stages pp*vpp=8 "
                                    "(parallel.layer_split 'balanced' or explicit counts "
                                    "allow an uneven split)")
        assert "number of microbatches m=3 to be a multiple of pp=2" in errors["interleaved m"]
        assert errors["count"] == ("microbatch count differs across pipeline stages: between 2 "
                                   "and 4")
        assert errors["shape"] == ("activation to send has shape (16, 2, 64) torch.float32; "
                                   "this step agreed on (8, 2, 64) torch.float32")
        assert 5.0 < loss < 9.0   # ~ln(1024) for a freshly initialised model
        assert elapsed < 30.0
    assert results[0][1] == results[1][1]
