"""ZB-H1 through the whole trainer: pp=2 x dp=2 with ZeRO-1 (the data-parallel buckets
fill during B and W, clipping and the inf check before the step) matches one process
(losses, grad norms, reduced gradients, updated parameters), and its checkpoint
continues under a single process with the same losses."""
from dist import run_workers
from engine.config import build_run_config
from engine.parallel.state import model_parallel_group
from engine.parallel.state import ParallelDims, init_distributed
from engine.train.trainer import Trainer
from test_trainer_parity import param_atol, MixedBatches, _close, manual_steps

SEQ = 24


def _cfg(out_dir, m, pp=1, dp=1, zero=0, schedule="1f1b", steps=4):
    return build_run_config({
        "model": {"preset": "tiny"},
        "parallel": {"pp": pp, "dp": dp, "zero_stage": zero, "schedule": schedule},
        "train": {"steps": steps, "micro_batch_size": 2, "num_microbatches": m,
                  "seq_len": SEQ, "warmup_steps": 1, "lr": 3e-3, "grad_clip": 0.5, "eps": 1e-4,
                  "eval_every": 0, "out_dir": str(out_dir)}})


def _worker(rank, world, out_dir, ckpt):
    state = init_distributed(ParallelDims(pp=2, dp=2), timeout=60, num_layers=4)
    tr = Trainer.from_config(_cfg(out_dir, m=2, pp=2, dp=2, zero=1, schedule="zb-h1"),
                             MixedBatches(), state=state, log=lambda *a: None,
                             mp_group=model_parallel_group(state))
    steps = manual_steps(tr, steps=2)
    tr.save(ckpt)
    return steps


def test_zb_h1_trainer_pp2_dp2_zero1_and_checkpoint(tmp_path):
    ref = Trainer.from_config(_cfg(tmp_path / "ref", m=4), MixedBatches(), log=lambda *a: None)
    ref_steps = manual_steps(ref, steps=4)
    ckpt = str(tmp_path / "ckpt")
    ranks = run_workers(_worker, 4, str(tmp_path / "a"), ckpt, timeout=150)
    for r, steps in enumerate(ranks):
        for t, ((loss, norm, grads, params), (rl, rn, rg, rp)) in enumerate(zip(steps,
                                                                                ref_steps)):
            assert abs(loss - rl) <= 1e-5 * abs(rl), (r, t, loss, rl)
            assert abs(norm - rn) <= 1e-5 * rn, (r, t, norm, rn)
            assert norm > 0.5  # clipping was active
            for name in grads:
                _close(grads[name], rg[name], f"rank {r} step {t} grad {name}")
                _close(params[name], rp[name], f"rank {r} step {t} param {name}",
                       param_atol(name))
    names = set(ranks[0][0][2]) | set(ranks[2][0][2])
    assert names == set(ref_steps[0][2])
    # the zb-h1 checkpoint resumes under one process and continues like the reference
    single = Trainer.from_config(_cfg(tmp_path / "b", m=4), MixedBatches(),
                                 log=lambda *a: None)
    single.resume(ckpt)
    assert single.step == 2
    cont = manual_steps(single, steps=2)
    for t, (got, want) in enumerate(zip(cont, ref_steps[2:])):
        assert abs(got[0] - want[0]) <= 1e-5 * abs(want[0]), (t, got[0], want[0])
