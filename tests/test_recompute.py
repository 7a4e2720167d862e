"""train.recompute (engine/train/recompute.py): full activation recomputation through the whole
trainer changes nothing but memory. With dropout on, recompute vs none from the same seed
gives the same losses, gradient norms, gradients and updated weights: in one process
(default generator, restored by torch.utils.checkpoint), and in two with tp2 + sequence
parallelism (dropout on sequence shards draws from the TP tracker, which the replay must
restore itself: without that snapshot the gradients differ) and pp2 with 1F1B and
interleaved 1F1B (the replay of a microbatch's layers runs after later forwards moved the
generator). The schedule's activation meter sees the saving."""
import pytest
import torch

import engine.train.recompute
from dist import run_workers
from engine.config import build_run_config, parse_overrides
from engine.parallel.state import model_parallel_group
from engine.parallel.state import ParallelDims, init_distributed
from engine.planner.measure import schedule_meter_peak
from engine.tensor_parallel import gather_full_tensors
from engine.train.trainer import Trainer
from test_trainer_parity import SEQ, MixedBatches, manual_steps

STEPS = 2
DROPOUT = 0.1


def _cfg(recompute, tp=1, pp=1, vpp=1, sp=False, dropout=DROPOUT, m=2):
    return build_run_config({
        # the masks under test are hidden_dropout's (embedding and both residual branches;
        # GLMConfig refuses attention dropout, which no attention kernel applies)
        "model": {"preset": "tiny", "hidden_dropout": dropout},
        "parallel": {"tp": tp, "pp": pp, "vpp": vpp, "sequence_parallel": sp,
                     "schedule": "interleaved" if vpp > 1 else "1f1b"},
        "train": {"steps": STEPS, "micro_batch_size": 2, "num_microbatches": m,
                  "seq_len": SEQ, "warmup_steps": 1, "lr": 3e-3, "grad_clip": 0.5,
                  "eps": 1e-4, "eval_every": 0, "recompute": recompute,
                  "out_dir": "/tmp/unused-recompute-run"}})


def _max_rel(a, b) -> float:
    """Max abs difference relative to the reference tensor's scale (elementwise relative
    error is meaningless for elements that are ~0 by cancellation)."""
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def _errors(got, ref) -> dict:
    """Worst relative error per quantity over the steps of two manual_steps runs."""
    err = dict(loss=0.0, norm=0.0, grad=0.0, param=0.0)
    for (loss, norm, grads, params), (rl, rn, rg, rp) in zip(got, ref, strict=True):
        assert grads.keys() == rg.keys() and params.keys() == rp.keys()
        err["loss"] = max(err["loss"], abs(loss - rl) / abs(rl))
        err["norm"] = max(err["norm"], abs(norm - rn) / rn)
        err["grad"] = max([err["grad"]] + [_max_rel(grads[n], rg[n]) for n in rg])
        err["param"] = max([err["param"]] + [_max_rel(params[n], rp[n]) for n in rp])
    return err


TOL = 1e-6


pytestmark = pytest.mark.usefixtures("single_thread")


def _assert_same(got, ref, what):
    err = _errors(got, ref)
    print(f"\n{what}: recompute vs none, max relative error {err}")
    assert all(e <= TOL for e in err.values()), (what, err)


def _run(cfg, **kw):
    tr = Trainer.from_config(cfg, MixedBatches(), log=lambda *a: None, **kw)
    return tr, manual_steps(tr, STEPS)


def test_flag_parses_and_is_checked():
    o = parse_overrides(["--train.recompute", "true"])
    assert build_run_config({}, o).train.recompute is True
    assert build_run_config({}).train.recompute is False
    with pytest.raises(ValueError, match="train.recompute='no' must be true or false"):
        build_run_config({}, parse_overrides(["--train.recompute", "no"]))


def test_single_process_dropout_matches_no_recompute():
    tr0, ref = _run(_cfg(False))
    tr1, got = _run(_cfg(True))
    assert all(getattr(b, "recompute", False) for b in tr1.model.layers.values())
    assert not any(getattr(b, "recompute", False) for b in tr0.model.layers.values())
    _assert_same(got, ref, "single process")
    # evaluation (no grad) takes the plain forward
    assert tr1.evaluate(MixedBatches(), 1) == tr0.evaluate(MixedBatches(), 1)
    # dropout is on: a run without it is another run (so the parity above is not vacuous)
    _, plain = _run(_cfg(False, dropout=0.0))
    assert abs(plain[0][0] - ref[0][0]) > 1e-4 * abs(ref[0][0])


def test_activation_meter_sees_less_with_recompute():
    """The schedule's SavedActivationMeter over one step of the 4-layer tiny model: with
    recompute each layer keeps only its input until its replay."""
    peaks = {}
    for rc in (False, True):
        tr = Trainer.from_config(_cfg(rc, dropout=0.0, m=1), MixedBatches(),
                                 log=lambda *a: None)
        peaks[rc] = schedule_meter_peak(tr)
    print(f"\nsaved-activation peak: {peaks[False]} B without recompute, {peaks[True]} B "
          "with")
    assert 0 < peaks[True] < 0.6 * peaks[False], peaks


def _tracker_run(recompute: bool):
    """F0 F1 B0 B1 (1F1B's order on a first stage) of a tiny GLM whose dropout all draws
    from a TP tracker, as under sequence parallelism, in one process: (gradients, the
    tracker's final states)."""
    from engine.train.recompute import recompute_layers
    from engine.tensor_parallel import TP_RNG, RNGTracker
    from model import GLM
    cfg = _cfg(recompute).model
    model = GLM.build(cfg, seed=0)
    tracker = RNGTracker()
    tracker.add(TP_RNG, 7)
    model.tp_rng = tracker
    model.set_dropout_rng(tracker.fork)
    if recompute:
        recompute_layers(model)
    losses = []
    for i in range(2):
        b = MixedBatches().get_batch(i, 2)
        losses.append(model(b["input_ids"], position_ids=b["position_ids"],
                            block_position_ids=b["block_position_ids"],
                            prefix_lens=b["prefix_lens"], labels=b["labels"]).sum())
    for loss in losses:
        loss.backward()
    return [p.grad for p in model.parameters()], tracker.state_dict()


def test_replay_restores_the_tracker_and_leaves_it_where_the_forwards_did():
    (g0, s0), (g1, s1) = _tracker_run(False), _tracker_run(True)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)


# ---- two processes ---------------------------------------------------------------------

def _layout_runs(layout: dict, restore_check: bool) -> dict:
    """manual_steps of no recompute, recompute, and (restore_check) recompute with the
    tracker snapshot disabled, all from the same seed in this process group."""
    cfg0 = _cfg(False, **layout)
    pc = cfg0.parallel
    state = init_distributed(ParallelDims(tp=pc.tp, pp=pc.pp, vpp=pc.vpp), timeout=60,
                             num_layers=cfg0.model.num_layers)

    def gather(named):   # TP shards -> full tensors, comparable across runs
        return gather_full_tensors(named, cfg0.model, state.tp_group)

    def run(rc):
        tr = Trainer.from_config(_cfg(rc, **layout), MixedBatches(), state=state,
                                 log=lambda *a: None, mp_group=model_parallel_group(state))
        return manual_steps(tr, STEPS, **({"gather": gather} if pc.tp > 1 else {}))

    out = {"none": run(False), "recompute": run(True)}
    if restore_check:
        # the replay continues the tracker's stream instead of repeating the forward's
        snapshot = engine.train.recompute._snapshot
        engine.train.recompute._snapshot = lambda tracker: None
        try:
            out["no-snapshot"] = run(True)
        finally:
            engine.train.recompute._snapshot = snapshot
    return out


def _worker(rank, world):
    return {"tp2-sp": _layout_runs(dict(tp=2, sp=True), restore_check=True),
            "pp2": _layout_runs(dict(pp=2, m=3), restore_check=False),
            "pp2-vpp2": _layout_runs(dict(pp=2, vpp=2, m=2), restore_check=False)}


@pytest.fixture(scope="module")
def two_ranks():
    return run_workers(_worker, 2, timeout=180, pg_timeout=120)


def test_tp2_sequence_parallel_dropout_matches_no_recompute(two_ranks):
    for r, runs in enumerate(two_ranks):
        _assert_same(runs["tp2-sp"]["recompute"], runs["tp2-sp"]["none"], f"tp2-sp rank {r}")


def test_tp2_sequence_parallel_needs_the_tracker_snapshot(two_ranks):
    """Without the snapshot the replay draws new masks on the sequence shards (so the
    gradients are not the forward's), and leaves the tracker further on (so the next
    microbatch's forward draws other masks too)."""
    for runs in two_ranks:
        err = _errors(runs["tp2-sp"]["no-snapshot"], runs["tp2-sp"]["none"])
        print(f"\ntp2-sp without the tracker snapshot: max relative error {err}")
        assert err["grad"] > 1e-2 and err["loss"] > 1e-4, err


@pytest.mark.parametrize("name", ["pp2", "pp2-vpp2"])
def test_pipeline_dropout_matches_no_recompute(two_ranks, name):
    """1F1B and interleaved 1F1B (two chunks per stage, one layer each)."""
    stages = []
    for r, runs in enumerate(two_ranks):
        _assert_same(runs[name]["recompute"], runs[name]["none"], f"{name} stage {r}")
        stages.append(set(runs[name]["none"][0][2]))
    assert stages[0] and stages[1] and not stages[0] & stages[1]   # two real stages
