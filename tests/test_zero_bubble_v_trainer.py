"""ZB-V through the whole trainer: pp=2 x dp=2, vpp=2 in the V, ZeRO-1 (the data-parallel
buckets fill during each chunk's B and W, clipping and the inf check before the step)
matches one process (losses, grad norms, reduced gradients, updated parameters), and its
checkpoint (parameters by their global names, wherever the V put them) continues under a
single process with the same losses."""
from dist import run_workers
from engine.parallel.state import model_parallel_group
from engine.parallel.state import ParallelDims, init_distributed
from engine.train.trainer import Trainer
from test_trainer_parity import param_atol, MixedBatches, _close, manual_steps
from test_zero_bubble_trainer import _cfg


def _v_cfg(out_dir, m):
    cfg = _cfg(out_dir, m=m, pp=2, dp=2, zero=1, schedule="zb-v")
    cfg.parallel.vpp = 2
    return cfg


def _worker(rank, world, out_dir, ckpt):
    state = init_distributed(ParallelDims(pp=2, dp=2, vpp=2), timeout=60, num_layers=4)
    tr = Trainer.from_config(_v_cfg(out_dir, m=2), MixedBatches(), state=state, log=lambda *a: None,
                 mp_group=model_parallel_group(state))
    layers = [c.layer_range for c in tr.chunks]
    steps = manual_steps(tr, steps=2)
    tr.save(ckpt)
    return layers, steps


def test_zb_v_trainer_pp2_dp2_zero1_and_checkpoint(tmp_path):
    ref = Trainer.from_config(_cfg(tmp_path / "ref", m=4), MixedBatches(), log=lambda *a: None)
    ref_steps = manual_steps(ref, steps=4)
    ckpt = str(tmp_path / "ckpt")
    ranks = run_workers(_worker, 4, str(tmp_path / "a"), ckpt, timeout=180)
    # ranks 0, 1: stage 0 (layers 0 and 3), ranks 2, 3: stage 1 (layers 1 and 2)
    assert [layers for layers, _ in ranks] == [[(0, 1), (3, 4)]] * 2 + [[(1, 2), (2, 3)]] * 2
    for r, (_, steps) in enumerate(ranks):
        for t, ((loss, norm, grads, params), (rl, rn, rg, rp)) in enumerate(zip(steps,
                                                                                ref_steps)):
            assert abs(loss - rl) <= 1e-5 * abs(rl), (r, t, loss, rl)
            assert abs(norm - rn) <= 1e-5 * rn, (r, t, norm, rn)
            assert norm > 0.5  # clipping was active
            for name in grads:
                _close(grads[name], rg[name], f"rank {r} step {t} grad {name}")
                _close(params[name], rp[name], f"rank {r} step {t} param {name}",
                       param_atol(name))
    names = set(ranks[0][1][0][2]) | set(ranks[2][1][0][2])
    assert names == set(ref_steps[0][2])
    single = Trainer.from_config(_cfg(tmp_path / "b", m=4), MixedBatches(), log=lambda *a: None)
    single.resume(ckpt)
    assert single.step == 2
    cont = manual_steps(single, steps=2)
    for t, (got, want) in enumerate(zip(cont, ref_steps[2:])):
        assert abs(got[0] - want[0]) <= 1e-5 * abs(want[0]), (t, got[0], want[0])
