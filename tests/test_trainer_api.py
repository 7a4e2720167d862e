"""The Trainer's public surface: built parts in, the step API out (what the planner's
measurement and the parity tests drive instead of its internals)."""
import torch

from engine.config import build_run_config
from engine.train import checkpointing
from engine.train.build import build_parts
from engine.train.trainer import Trainer, lr_at
from test_trainer import RandomTokens


def _cfg(out_dir, **model):
    return build_run_config({"model": {"preset": "tiny", **model},
                             "train": {"steps": 3, "micro_batch_size": 2, "num_microbatches": 2,
                                       "seq_len": 16, "warmup_steps": 1, "eval_every": 0,
                                       "out_dir": str(out_dir)}})


def _params(tr) -> dict:
    return {n: p.detach().clone() for n, p in tr.named_trained_parameters()}


def test_trainer_over_built_parts_is_from_config(tmp_path):
    cfg = _cfg(tmp_path / "a")
    parts = build_parts(cfg)
    assert parts.comm is None and len(parts.chunks) == 1 and parts.autocast_dtype is None
    built = Trainer(cfg, parts, RandomTokens(16), log=lambda *_: None)
    assert built.optimizer is parts.optimizer and built.chunks is parts.chunks
    made = Trainer.from_config(_cfg(tmp_path / "b"), RandomTokens(16), log=lambda *_: None)
    assert [s.loss for s in built.fit()] == [s.loss for s in made.fit()]
    assert all(torch.equal(a, b) for a, b in zip(_params(built).values(),
                                                 _params(made).values()))


def test_step_api_reproduces_train_step_bitwise(tmp_path):
    by_step = Trainer.from_config(_cfg(tmp_path / "a"), RandomTokens(16), log=lambda *_: None)
    by_hand = Trainer.from_config(_cfg(tmp_path / "b"), RandomTokens(16), log=lambda *_: None)
    for t in range(3):
        want = by_step.train_step()
        mbs = by_hand.microbatches(by_hand.train_data, t)
        loss = by_hand.forward_backward(mbs)
        result = by_hand.optimizer_step(lr_at(t, by_hand.cfg.train))
        assert by_hand.step == t       # the step API does not move the counter
        by_hand.step += 1
        assert (loss, result.grad_norm) == (want.loss, want.grad_norm), t
    assert all(torch.equal(a, b) for a, b in zip(_params(by_step).values(),
                                                 _params(by_hand).values()))


def test_forward_loss_is_dropout_free_gradient_free_and_leaves_training_mode(tmp_path):
    def make(d):
        return Trainer.from_config(_cfg(tmp_path / d, hidden_dropout=0.5), RandomTokens(16),
                                   log=lambda *_: None)
    tr = make("a")
    mbs = tr.microbatches(tr.train_data, 0)
    rng = torch.get_rng_state()
    first, second = tr.forward_loss(mbs), tr.forward_loss(mbs)
    assert first == second and torch.equal(rng, torch.get_rng_state())
    assert all(c.training for c in tr.chunks)
    assert all(not g.any() for g in tr.optimizer.full_grads().values())
    # the training forward of the same state and batch has dropout, and gradients
    other = make("b")
    assert other.forward_backward(mbs) != first
    assert any(g.any() for g in other.optimizer.full_grads().values())


def test_checkpointing_gather_and_resume_round_trip(tmp_path):
    tr = Trainer.from_config(_cfg(tmp_path / "a"), RandomTokens(16), log=lambda *_: None)
    tr.fit(stop_at=2)
    full, tensors, optim = checkpointing.gather(tr.parts, tr.cfg.model)
    assert set(tensors) == {n for n, _ in tr.named_trained_parameters()}
    assert set(optim) == {f"{k}/{n}" for k in checkpointing.OPTIM_KEYS for n in tensors}
    path = tr.save()
    assert tr.saved_step == 2 and tr.save() == path     # saved once per state
    again = Trainer.from_config(_cfg(tmp_path / "b"), RandomTokens(16), log=lambda *_: None)
    checkpointing.resume(again, path)
    assert again.step == 2
    assert all(torch.equal(a, b) for a, b in zip(_params(tr).values(),
                                                 _params(again).values()))
    assert [s.loss for s in again.fit()] == [s.loss for s in tr.fit()]
