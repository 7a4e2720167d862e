"""Pipeline layouts reproduce the single-process model: losses, gradients before each
optimizer step and parameters after it, fp32, 3 AdamW steps from the same seed and data.

Workers return numpy copies (plain pickles); the parent computes the single-process
reference (the plain tiny GLM, gradient accumulation over all microbatches) once.
"""
import functools

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist import run_workers
from engine.pipeline.p2p import P2P
from engine.parallel.state import ParallelDims, init_distributed
from engine.pipeline.executor import _backward_freed, _free_output
from engine.pipeline.schedules import StepContext, forward_backward
from engine.pipeline.stage import build_stage
from engine.pipeline.stats import SavedActivationMeter, ScheduleStats
from model import GLM, GLMConfig
from model.masks import (IGNORE, GLMExample, causal_example, collate, corrupt_spans,
                         gmask_example, pack)

SEQ, BATCH = 16, 2
PAD, MASK, SOP, EOP, GMASK = 0, 1, 2, 3, 4
RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("single_thread")


def config(layers: int = 4):
    return GLMConfig.preset("tiny", num_layers=layers)


def microbatches(m: int, step: int, offset: int = 0, seq: int = SEQ) -> list[dict]:
    """m microbatches cycling prefix-LM, blank infilling (2D positions) and [gMASK];
    every 4th is packed rows ([gMASK] + blank infilling per row, document masking)."""
    out = []
    for i in range(offset, offset + m):
        g = torch.Generator().manual_seed(1000 * step + i)
        toks = lambda n: torch.randint(10, 1024, (n,), generator=g).tolist()  # noqa: E731
        if i % 4 == 3:
            rows = [[gmask_example(toks(6), 2 + r, GMASK, SOP, EOP),
                     corrupt_spans(toks(4), MASK, SOP, EOP, g, ratio=0.3)]
                    for r in range(BATCH)]
            out.append(pack(rows, seq, PAD))
            continue
        if i % 3 == 0:
            # prefix-LM: bidirectional prefix, causal continuation, loss after the prefix
            exs = []
            for r in range(BATCH):
                ex, prefix = causal_example(toks(15 - r)), 5 + r
                labels = [IGNORE] * (prefix - 1) + ex.labels[prefix - 1:]
                exs.append(GLMExample(ex.input_ids, ex.position_ids, ex.block_position_ids,
                                      labels, prefix))
        elif i % 3 == 1:
            exs = [corrupt_spans(toks(10), MASK, SOP, EOP, g, ratio=0.3) for _ in range(BATCH)]
        else:
            exs = [gmask_example(toks(12), 5 + r, GMASK, SOP, EOP) for r in range(BATCH)]
        out.append(collate(exs, seq, PAD))
    return out


def count_tokens(mbs) -> int:
    return int(sum((mb["labels"] != IGNORE).sum() for mb in mbs))


def numpy_dict(named):
    return {n: t.detach().clone().numpy() for n, t in named}


def make_opt(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


@functools.lru_cache(maxsize=None)
def reference(m: int, steps: int, dp: int = 1, layers: int = 4):
    """Single process, all `layers`, plain gradient accumulation over all microbatches.
    With dp > 1 the microbatches are accumulated in dp contiguous groups whose gradient
    sums are then added, the order a data-parallel SUM uses; it only matters in the
    last bit, but Adam's g / sqrt(v) can magnify last-bit differences on near-zero
    gradient entries, and the comparison is at 1e-5."""
    model = GLM.build(config(layers), seed=0)
    opt = make_opt(model.parameters())
    out = []
    for step in range(steps):
        mbs = microbatches(m, step)
        n = count_tokens(mbs)
        loss, per_mb, total = 0.0, [], None
        for group in range(dp):
            opt.zero_grad(set_to_none=True)
            for mb in mbs[group * m // dp:(group + 1) * m // dp]:
                token_losses = model(**{k: v for k, v in mb.items() if k != "labels"},
                                     labels=mb["labels"])
                per_mb.append(token_losses.detach().numpy())
                mb_loss = token_losses.sum() / n
                mb_loss.backward()
                loss += mb_loss.item()
            grads = [p.grad.clone() for p in model.parameters()]
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        for p, g in zip(model.parameters(), total):
            p.grad = g
        grads = numpy_dict((k, p.grad) for k, p in model.named_parameters())
        opt.step()
        out.append(dict(loss=loss, per_mb=per_mb, grads=grads,
                        params=numpy_dict(model.named_parameters())))
    return out


# ---- workers --------------------------------------------------------------------------

class Counter:
    """A no_sync stand-in that counts the backwards it wraps."""

    def __init__(self):
        self.n = 0

    def __call__(self):
        import contextlib
        self.n += 1
        return contextlib.nullcontext()


def _train_case(state, schedule, m, steps, dp_offset=0, dp_m=None):
    cfg = config()
    chunks = build_stage(cfg, state.dims.pp, state.dims.vpp, state.stage, seed=0)
    opt = make_opt([p for c in chunks for p in c.parameters()])
    comm = P2P(state, cfg.hidden_size, timeout=30)
    steps_out = []
    for step in range(steps):
        global_mbs = microbatches(m, step)
        mine = global_mbs[dp_offset:dp_offset + (dp_m or m)]
        opt.zero_grad(set_to_none=True)
        stats, no_sync = ScheduleStats(), Counter()
        loss = forward_backward(StepContext(schedule, chunks, mine, count_tokens(global_mbs),
                                            comm, state, no_sync=no_sync, stats=stats))
        if state.dims.dp > 1:  # what engine/optimizer.py does: SUM over data parallel
            for c in chunks:
                for p in c.parameters():
                    dist.all_reduce(p.grad, group=state.dp_group)
        grads = numpy_dict((n, p.grad) for c in chunks for n, p in c.named_parameters())
        opt.step()
        steps_out.append(dict(loss=loss, grads=grads, peak=stats.peak_in_flight,
                              handshakes=comm.handshakes,
                              freed=stats.outputs_freed, no_sync=no_sync.n,
                              params=numpy_dict(n_p for c in chunks
                                                for n_p in c.named_parameters())))
    return steps_out


def _reshaped_case(state):
    """One P2P over steps whose sequence length changes: shapes are agreed on the first
    step and again only when they change."""
    cfg = config()
    chunks = build_stage(cfg, 2, 1, state.stage, seed=0)
    comm = P2P(state, cfg.hidden_size, timeout=30)
    out = []
    for seq in (16, 16, 24, 24, 16):
        mbs = microbatches(2, 0, seq=seq)
        loss = forward_backward(StepContext("1f1b", chunks, mbs, count_tokens(mbs), comm,
                                            state, forward_only=True))
        out.append((seq, loss, comm.handshakes))
    return out


def _forward_only_case(state, m):
    cfg = config()
    chunks = build_stage(cfg, state.dims.pp, state.dims.vpp, state.stage, seed=0)
    mbs = microbatches(m, 0)
    outputs = []
    schedule = "1f1b" if state.dims.vpp == 1 else "interleaved"
    loss = forward_backward(StepContext(schedule, chunks, mbs, count_tokens(mbs),
                                        P2P(state, cfg.hidden_size, timeout=30), state,
                                        forward_only=True, outputs=outputs))
    assert all(p.grad is None for c in chunks for p in c.parameters())
    return dict(loss=loss, per_mb=[o.numpy() for o in outputs])


def _memory_case(state, schedule, m):
    cfg = config()
    chunks = build_stage(cfg, state.dims.pp, 1, state.stage, seed=0)
    mbs = microbatches(m, 0)
    meter = SavedActivationMeter(p for c in chunks for p in c.parameters())
    stats = ScheduleStats()
    forward_backward(StepContext(schedule, chunks, mbs, count_tokens(mbs),
                                 P2P(state, cfg.hidden_size, timeout=30), state, stats=stats,
                                 meter=meter))
    return dict(peak_bytes=meter.peak, end_bytes=meter.current, peak=stats.peak_in_flight,
                freed=stats.outputs_freed)


def _pp2_worker(rank, world):
    out = {}
    state = init_distributed(ParallelDims(pp=2), timeout=30, num_layers=config().num_layers)
    for schedule in ("1f1b", "gpipe", "zb-h1"):
        out[schedule] = _train_case(state, schedule, m=4, steps=3)
    out["zb-h1 m<p"] = _train_case(state, "zb-h1", m=1, steps=1)
    out["reshaped"] = _reshaped_case(state)
    out["1f1b m<p"] = _train_case(state, "1f1b", m=1, steps=1)
    out["forward-only"] = _forward_only_case(state, m=3)
    for schedule in ("1f1b", "gpipe"):
        out["memory " + schedule] = _memory_case(state, schedule, m=4)
    state = init_distributed(ParallelDims(pp=2, vpp=2), timeout=30,
                             num_layers=config().num_layers)
    out["interleaved"] = _train_case(state, "interleaved", m=4, steps=3)
    out["interleaved m=p"] = _train_case(state, "interleaved", m=2, steps=1)
    out["interleaved forward-only"] = _forward_only_case(state, m=3)
    return out


def _pp4_worker(rank, world):
    out = {}
    state = init_distributed(ParallelDims(pp=4), timeout=30, num_layers=config().num_layers)
    out["1f1b"] = _train_case(state, "1f1b", m=5, steps=3)
    out["gpipe"] = _train_case(state, "gpipe", m=3, steps=1)
    out["1f1b m<p"] = _train_case(state, "1f1b", m=2, steps=1)
    out["zb-h1"] = _train_case(state, "zb-h1", m=5, steps=2)
    out["forward-only"] = _forward_only_case(state, m=3)
    # pp=2 x dp=2 on the same 4 processes: 4 global microbatches, 2 per data-parallel rank
    state = init_distributed(ParallelDims(pp=2, dp=2), timeout=30)
    out["pp2 dp2"] = _train_case(state, "1f1b", m=4, steps=2, dp_offset=2 * state.coords.dp,
                                 dp_m=2)
    out["pp2 dp2 zb-h1"] = _train_case(state, "zb-h1", m=4, steps=2,
                                       dp_offset=2 * state.coords.dp, dp_m=2)
    out["pp2 dp2 coords"] = (state.coords.pp, state.coords.dp, state.pp_ranks, state.dp_ranks)
    return out


@pytest.fixture(scope="module")
def pp2():
    return run_workers(_pp2_worker, 2, timeout=120)


@pytest.fixture(scope="module")
def pp4():
    return run_workers(_pp4_worker, 4, timeout=150)


# ---- comparisons ----------------------------------------------------------------------

def assert_rel(got: np.ndarray, want: np.ndarray, what: str, rtol: float = RTOL):
    """max |got - want| relative to max |want| (per tensor)."""
    scale = max(float(np.abs(want).max()), 1e-12)
    err = float(np.abs(got - want).max()) / scale
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol}"


def check_training(results, key, m, steps):
    ref = reference(m, steps)
    names = set()
    for rank, res in enumerate(results):
        for step, (got, want) in enumerate(zip(res[key], ref)):
            assert got["loss"] == pytest.approx(want["loss"], rel=RTOL), (key, rank, step)
            for n, g in got["grads"].items():
                assert_rel(g, want["grads"][n], f"{key} rank {rank} step {step} grad {n}")
            for n, p in got["params"].items():
                assert_rel(p, want["params"][n], f"{key} rank {rank} step {step} param {n}")
            names |= set(got["params"])
    assert names == set(ref[0]["params"]), "the stages together must hold every parameter"


@pytest.mark.parametrize("key, m", [("1f1b", 4), ("gpipe", 4), ("interleaved", 4),
                                    ("zb-h1", 4)])
def test_pp2_parity(pp2, key, m):
    check_training(pp2, key, m, steps=3)


def test_pp2_small_m(pp2):
    check_training(pp2, "1f1b m<p", m=1, steps=1)
    check_training(pp2, "interleaved m=p", m=2, steps=1)
    check_training(pp2, "zb-h1 m<p", m=1, steps=1)


@pytest.mark.parametrize("key, m, steps", [("1f1b", 5, 3), ("gpipe", 3, 1), ("1f1b m<p", 2, 1),
                                           ("zb-h1", 5, 2)])
def test_pp4_parity(pp4, key, m, steps):
    check_training(pp4, key, m, steps)


@pytest.mark.parametrize("key", ["pp2 dp2", "pp2 dp2 zb-h1"])
def test_pp2_dp2_parity_and_groups(pp4, key):
    # each dp rank holds its pipeline's stage; grads summed over dp equal the global ones
    ref = reference(4, 2, dp=2)
    for rank, res in enumerate(pp4):
        pp_rank, dp_rank, pp_ranks, dp_ranks = res["pp2 dp2 coords"]
        assert (pp_rank, dp_rank) == (rank // 2, rank % 2)
        assert pp_ranks == [rank % 2, rank % 2 + 2] and dp_ranks == [rank - rank % 2,
                                                                     rank - rank % 2 + 1]
        for step, (got, want) in enumerate(zip(res[key], ref)):
            assert got["loss"] == pytest.approx(want["loss"], rel=RTOL)
            for n, g in got["grads"].items():
                assert_rel(g, want["grads"][n], f"pp2 dp2 rank {rank} grad {n}")
            for n, p in got["params"].items():
                assert_rel(p, want["params"][n], f"pp2 dp2 rank {rank} param {n}")


def test_shapes_agreed_once_and_again_on_change(pp2):
    model = GLM.build(config(), seed=0)
    for res in pp2:
        # 3 steps with one comm: one handshake
        assert [s["handshakes"] for s in res["1f1b"]] == [1, 1, 1]
        assert [h for _, _, h in res["reshaped"]] == [1, 1, 2, 2, 3]
        for seq, loss, _ in res["reshaped"]:
            mbs = microbatches(2, 0, seq=seq)
            with torch.no_grad():
                want = sum(float(model(**{k: v for k, v in mb.items() if k != "labels"},
                                       labels=mb["labels"]).sum()) for mb in mbs)
            assert loss == pytest.approx(want / count_tokens(mbs), rel=RTOL), seq


def test_forward_only_equals_single_process(pp2, pp4):
    ref = reference(3, 1)[0]
    for results, key in ((pp2, "forward-only"), (pp2, "interleaved forward-only"),
                         (pp4, "forward-only")):
        for res in results:
            assert res[key]["loss"] == pytest.approx(ref["loss"], rel=RTOL)
        last = results[-1][key]["per_mb"]
        assert len(last) == 3
        for got, want in zip(last, ref["per_mb"]):
            assert_rel(got, want, key)
        assert all(r[key]["per_mb"] == [] for r in results[:-1])


def test_one_f_one_b_bounds_in_flight_and_frees_sent_outputs(pp2, pp4):
    for results, p, m in ((pp2, 2, 4), (pp4, 4, 5), (pp4, 4, 2)):
        key = "1f1b" if m != 2 else "1f1b m<p"
        for s, res in enumerate(results):
            assert res[key][0]["peak"] == min(p - s, m), (p, m, s)
            # every output sent downstream lost its .data (the last stage sends none)
            assert res[key][0]["freed"] == (m if s < p - 1 else 0)
    for s, res in enumerate(pp2):
        # ZB-H1 holds a microbatch from F to W: p on every stage (1F1B's stage-0 peak)
        assert res["zb-h1"][0]["peak"] == 2
        assert res["gpipe"][0]["peak"] == 4
        assert res["interleaved"][0]["peak"] == min(8, (2 - s - 1) * 2 + 2 + 1)


def test_no_sync_wraps_all_but_the_last_backward_of_each_chunk(pp2):
    for res in pp2:
        assert res["1f1b"][0]["no_sync"] == 4 - 1
        # split backward: the reduction rides on the last B and the last W
        assert res["zb-h1"][0]["no_sync"] == 2 * 4 - 2
        assert res["interleaved"][0]["no_sync"] == 4 * 2 - 2


def test_stage0_activation_memory_1f1b_vs_gpipe(pp2):
    p, m = 2, 4
    one_f, gpipe = pp2[0]["memory 1f1b"], pp2[0]["memory gpipe"]
    assert one_f["peak"] == 2 and gpipe["peak"] == 4
    # saved-for-backward bytes: 1F1B keeps p of the m microbatches GPipe keeps
    assert one_f["peak_bytes"] <= (p / m) * gpipe["peak_bytes"] * 1.10
    assert one_f["peak_bytes"] > 0.3 * gpipe["peak_bytes"]   # and does keep some
    for res in pp2:  # every saved tensor was released by the end of the step
        assert res["memory 1f1b"]["end_bytes"] == 0 and res["memory gpipe"]["end_bytes"] == 0


# ---- single process -------------------------------------------------------------------

def test_no_pipeline_schedule_is_gradient_accumulation():
    ref = reference(3, 1)[0]
    model = GLM.build(config(), seed=0)
    mbs = microbatches(3, 0)
    loss = forward_backward(StepContext("none", [model], mbs, count_tokens(mbs)))
    assert loss == pytest.approx(ref["loss"], rel=RTOL)
    for n, p in model.named_parameters():
        assert_rel(p.grad.numpy(), ref["grads"][n], n)


def test_deallocated_output_backward_matches_plain_backward():
    cfg = config()
    mb = microbatches(1, 0)[0]
    kwargs = dict(position_ids=mb["position_ids"], block_position_ids=mb["block_position_ids"],
                  prefix_lens=mb["prefix_lens"])
    grads = []
    for free in (False, True):
        first = GLM.build(cfg, seed=0, layer_range=(0, 2), post_process=False)
        y = first(mb["input_ids"], **kwargs)                  # [s, b, h]
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
        if free:
            _free_output(y)
            assert y.numel() == 1                              # the activation is gone
            _backward_freed(y, g)
        else:
            y.backward(g)
        grads.append({n: p.grad.clone() for n, p in first.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0)
