"""Checkpoints across layouts with tensor parallelism: 3 steps under tp=2 x pp=2, saved,
then continued for 3 more under one process, under tp=1 x pp=4 and under tp=4 (the tiny
preset's 2 KV groups are replicated over 4 ranks). Every continuation reproduces steps
4-6 of an uninterrupted single-process run: losses and updated parameters within 1e-5
relative. The same checkpoint also goes to the ChatGLM naming and back
(runners/convert_checkpoint.py) bit for bit."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dist import run_workers
from engine.train import checkpoint as ckpt_lib
from engine.config import build_run_config
from engine.parallel.state import model_parallel_group
from engine.parallel.state import ParallelDims, ParallelState, init_distributed
from engine.tensor_parallel import gather_full_tensors
from engine.train.trainer import Trainer
from test_trainer_parity import PARAM_ATOL, MixedBatches, _close

STEPS, SAVE_AT, SEQ = 6, 3, 24
GLOBAL_MB = 4                    # microbatches per step (every layout here has dp = 1)


def _cfg(out_dir, tp=1, pp=1, init_from=""):
    # eps = 1e-4: see test_trainer_parity (parameters compared strictly, not just losses)
    return build_run_config({
        "model": {"preset": "tiny"},
        "parallel": {"tp": tp, "pp": pp, "schedule": "1f1b"},
        "train": {"steps": STEPS, "micro_batch_size": 2, "num_microbatches": GLOBAL_MB,
                  "seq_len": SEQ, "warmup_steps": 2, "lr": 3e-3, "grad_clip": 1.0,
                  "eps": 1e-4, "eval_every": 0, "out_dir": str(out_dir),
                  "init_from": init_from}})


def _trainer(cfg):
    pc = cfg.parallel
    state = ParallelState.single()
    if pc.tp * pc.pp > 1:
        state = init_distributed(ParallelDims(tp=pc.tp, pp=pc.pp), timeout=60,
                                 num_layers=cfg.model.num_layers)
    return Trainer.from_config(cfg, MixedBatches(), state=state, log=lambda *a: None,
                               mp_group=model_parallel_group(state))


def _full_params(tr) -> dict:
    """This rank's parameters at full shape, from tp rank 0 only (the others return {})."""
    named = [(n, p.detach()) for n, p in tr.named_trained_parameters()]
    if tr.tp == 1:
        return {n: t.clone() for n, t in named}
    full = gather_full_tensors(named, tr.cfg.model, tr.state.tp_group)
    return full if tr.tp_rank == 0 else {}


def _train_and_save(rank, world, out_dir, ckpt):
    tr = _trainer(_cfg(out_dir, tp=2, pp=2))
    losses = [s.loss for s in tr.fit(stop_at=SAVE_AT)]
    tr.save(ckpt)
    return losses


def _resume(rank, world, out_dir, ckpt, tp, pp):
    tr = _trainer(_cfg(out_dir, tp=tp, pp=pp))
    tr.resume(ckpt)
    assert tr.step == SAVE_AT
    return [s.loss for s in tr.fit()], _full_params(tr)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, single_thread):
    """(reference losses, reference final parameters, tp=2 x pp=2 checkpoint after 3 steps)."""
    root = tmp_path_factory.mktemp("tp_ckpt")
    ref = _trainer(_cfg(root / "ref"))
    ref_losses = [s.loss for s in ref.fit()]
    ref_params = _full_params(ref)
    ckpt = str(root / "ckpt")
    first = run_workers(_train_and_save, 4, str(root / "a"), ckpt, timeout=80)
    return ref_losses, ref_params, ckpt, first


def test_tp2_pp2_run_matches_and_saves_full_tensors(saved):
    ref_losses, ref_params, ckpt, first = saved
    assert all(f == first[0] for f in first)     # every rank reports the same step loss
    torch.testing.assert_close(torch.tensor(first[0]), torch.tensor(ref_losses[:SAVE_AT]),
                               rtol=1e-5, atol=0)
    c = ckpt_lib.Checkpoint(ckpt)
    assert c.meta["layout"]["tp"] == 2 and c.meta["layout"]["pp"] == 2
    assert c.meta["step"] == SAVE_AT
    # layout-free: full names and full shapes, whatever tp saved them
    assert set(c.names("model")) == set(ref_params)
    for n, t in c.load("model").items():
        assert t.shape == ref_params[n].shape, n
    assert set(c.names("optim")) == {f"{k}/{n}" for k in ("master", "exp_avg", "exp_avg_sq")
                                     for n in ref_params}


def _check_continuation(got, ref_losses, ref_params, what):
    losses = [g[0] for g in got]
    assert all(x == losses[0] for x in losses), (what, losses)   # same loss on every rank
    for t, (a, b) in enumerate(zip(losses[0], ref_losses[SAVE_AT:])):
        assert abs(a - b) <= 1e-5 * abs(b), (what, SAVE_AT + t + 1, a, b)
    params = {}
    for g in got:
        assert not set(params) & set(g[1]), what     # each tensor from one writer only
        params.update(g[1])
    assert set(params) == set(ref_params), what      # the ranks cover the whole model
    for n, p in params.items():
        assert p.shape == ref_params[n].shape, (what, n)
        _close(p, ref_params[n], f"{what} {n}", PARAM_ATOL)


def test_continue_in_one_process(saved, tmp_path):
    ref_losses, ref_params, ckpt, _ = saved
    got = _resume(0, 1, tmp_path / "b", ckpt, 1, 1)
    _check_continuation([got], ref_losses, ref_params, "single process")


@pytest.mark.parametrize("tp,pp", [(1, 4), (4, 1)], ids=["tp1-pp4", "tp4"])
def test_continue_under_another_layout(saved, tmp_path, tp, pp):
    ref_losses, ref_params, ckpt, _ = saved
    got = run_workers(_resume, tp * pp, str(tmp_path / "c"), ckpt, tp, pp, timeout=80)
    _check_continuation(got, ref_losses, ref_params, f"tp={tp} pp={pp}")


# ---- ChatGLM naming round trip ----------------------------------------------------------

def _convert(direction, src, out) -> list[str]:
    return ["--convert.direction", direction, "--convert.checkpoint", str(src),
            "--convert.out_dir", str(out)]


def _first_loss(cfg) -> float:
    return _trainer(cfg).fit(stop_at=1)[0].loss


def test_chatglm_round_trip_is_bitwise(saved, tmp_path):
    from engine.train.convert_command import main
    _, ref_params, ckpt, _ = saved
    hf, back = tmp_path / "chatglm", tmp_path / "native"
    main(_convert("to_chatglm", ckpt, hf))
    with open(hf / "config.json") as f:
        assert json.load(f)["num_layers"] == 4
    assert (hf / "model.safetensors.index.json").is_file()
    main(_convert("from_chatglm", hf, back))

    orig, imported = ckpt_lib.Checkpoint(ckpt), ckpt_lib.Checkpoint(str(back))
    assert imported.meta["step"] == 0 and imported.names("optim") == []
    assert imported.meta["config"]["model"] == orig.meta["config"]["model"]
    a, b = orig.load("model"), imported.load("model")
    assert set(a) == set(b) == set(ref_params)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n

    # init_from the imported checkpoint starts exactly where init_from the original does
    loss_orig = _first_loss(_cfg(tmp_path / "o", init_from=ckpt))
    loss_imp = _first_loss(_cfg(tmp_path / "i", init_from=str(back)))
    loss_fresh = _first_loss(_cfg(tmp_path / "f"))
    assert loss_imp == loss_orig
    assert loss_fresh != loss_orig        # the weights really came from the checkpoint


def test_convert_errors_are_one_line(saved, tmp_path):
    from engine.train.convert_command import main
    _, _, ckpt, _ = saved
    cases = [
        (_convert("to_chatglm", tmp_path / "nope", tmp_path / "x"), "does not exist"),
        (_convert("from_chatglm", tmp_path, tmp_path / "y"), "config.json"),
        (_convert("to_chatglm", ckpt, ckpt), "exists"),      # never overwrites without --force
    ]
    for argv, match in cases:
        with pytest.raises(SystemExit, match=match) as e:
            main(argv)
        assert "\n" not in str(e.value)
    assert ckpt_lib.Checkpoint(ckpt).meta["step"] == SAVE_AT   # untouched
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
