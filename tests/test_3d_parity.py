"""tp x pp x dp through the whole trainer reproduces one process: losses, gradients
before each step (gathered to full shape) and parameters after it, on mixed causal /
prefix-LM / blank-infilling batches. Includes a GQA model whose KV groups are fewer than
the tensor-parallel ranks (replicated KV heads) and sequence parallelism."""
import pytest

from dist import run_workers
from engine.config import build_run_config
from engine.parallel.state import model_parallel_group
from engine.parallel.state import ParallelDims, init_distributed
from engine.tensor_parallel import gather_full_tensors
from engine.train.trainer import Trainer
from test_trainer_parity import param_atol, STEPS, MixedBatches, _close, manual_steps

SEQ = 24
GLOBAL_MB = 4   # microbatches per step over the whole job


def _cfg(tp=1, pp=1, dp=1, zero=0, sp=False, groups=2):
    return build_run_config({
        "model": {"preset": "tiny", "multi_query_group_num": groups},
        "parallel": {"tp": tp, "pp": pp, "dp": dp, "zero_stage": zero,
                     "sequence_parallel": sp, "schedule": "1f1b"},
        "train": {"steps": STEPS, "micro_batch_size": 2, "num_microbatches": GLOBAL_MB // dp,
                  "seq_len": SEQ, "warmup_steps": 1, "lr": 3e-3, "grad_clip": 0.5, "eps": 1e-4,
                  "eval_every": 0, "out_dir": "/tmp/unused-3d-run"}})


def _worker(rank, world, layout):
    cfg = _cfg(**layout)
    pc = cfg.parallel
    state = init_distributed(ParallelDims(tp=pc.tp, pp=pc.pp, dp=pc.dp), timeout=90,
                             num_layers=cfg.model.num_layers)
    tr = Trainer.from_config(cfg, MixedBatches(), state=state, log=lambda *a: None,
                             mp_group=model_parallel_group(state))

    def gather(named):
        return gather_full_tensors(named, cfg.model, state.tp_group)

    return manual_steps(tr, gather=gather)


LAYOUTS = {
    "tp2": dict(tp=2),
    "tp2-sp": dict(tp=2, sp=True),
    "tp2-pp2-gqa1": dict(tp=2, pp=2, groups=1),
    "tp2-dp2-zero1": dict(tp=2, dp=2, zero=1),
    "tp2-pp2-dp2-zero1": dict(tp=2, pp=2, dp=2, zero=1),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name):
    layout = LAYOUTS[name]
    world = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp", 1)
    ref_cfg = _cfg(groups=layout.get("groups", 2))
    ref = manual_steps(Trainer.from_config(ref_cfg, MixedBatches(), log=lambda *a: None))
    ranks = run_workers(_worker, world, layout, timeout=240, pg_timeout=120)
    seen = set()
    for r, steps in enumerate(ranks):
        for t, ((loss, norm, grads, params), (rl, rn, rg, rp)) in enumerate(zip(steps, ref)):
            assert abs(loss - rl) <= 1e-5 * abs(rl), (name, r, t, loss, rl)
            assert abs(norm - rn) <= 1e-5 * rn, (name, r, t, norm, rn)
            for n in grads:
                assert grads[n].shape == rg[n].shape, (n, grads[n].shape, rg[n].shape)
                _close(grads[n], rg[n], f"{name} rank {r} step {t} grad {n}")
                _close(params[n], rp[n], f"{name} rank {r} step {t} param {n}", param_atol(n))
            seen |= set(grads)
    assert seen == set(ref[0][2])   # the ranks together cover every parameter
