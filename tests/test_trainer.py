import json
import os

import pytest
import torch

from engine.train import checkpoint as ckpt_lib
from engine.config import build_run_config, parse_overrides
from engine.train.trainer import Trainer, lr_at
from model.masks import causal_example, collate


class RandomTokens:
    """A stateless dataset: batch i is a pure function of (seed, i)."""

    def __init__(self, seq_len, vocab=1000, seed=0):
        self.seq_len, self.vocab, self.seed = seq_len, vocab, seed

    def get_batch(self, index, batch_size):
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        rows = torch.randint(4, self.vocab, (batch_size, self.seq_len + 1), generator=g)
        return collate([causal_example(r.tolist()) for r in rows], self.seq_len, pad_id=0)


def _cfg(tmp_path, **train):
    return build_run_config({"model": {"preset": "tiny"},
                             "train": {"steps": 6, "micro_batch_size": 2, "num_microbatches": 2,
                                       "seq_len": 16, "warmup_steps": 2, "log_every": 1,
                                       "eval_every": 3, "eval_batches": 1,
                                       "out_dir": str(tmp_path / "run"), **train}})


def test_overrides_and_validation():
    o = parse_overrides(["--train.lr", "3e-4", "--model.preset=small", "--parallel.pp", "2"])
    cfg = build_run_config({"train": {"steps": 5}}, o)
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 5 and cfg.parallel.pp == 2
    assert cfg.model.hidden_size == 256
    with pytest.raises(ValueError, match="train.steps=0"):
        build_run_config({"train": {"steps": 0}})
    with pytest.raises(ValueError, match="unknown train field"):
        build_run_config({"train": {"stepz": 1}})
    with pytest.raises(ValueError, match="overrides look like"):
        parse_overrides(["lr"])


def test_lr_schedule_warmup_then_cosine(tmp_path):
    tc = _cfg(tmp_path, steps=100, warmup_steps=10, lr=1.0, min_lr=0.1).train
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(10, tc) == pytest.approx(1.0) and lr_at(100, tc) == pytest.approx(0.1)
    assert lr_at(55, tc) == pytest.approx(0.55)


def test_training_reduces_loss_and_logs(tmp_path):
    cfg = _cfg(tmp_path, steps=12, lr=3e-3)
    data = RandomTokens(16, vocab=64)  # tiny vocab: learnable unigram statistics
    lines = []
    tr = Trainer.from_config(cfg, data, RandomTokens(16, vocab=64, seed=9), log=lines.append)
    hist = tr.fit()
    assert hist[-1].loss < hist[0].loss - 0.5
    records = [json.loads(x) for x in open(tr.metrics_path)]
    assert len(records) == 12 and "dev_loss" in records[2]
    assert any("tok/s" in line for line in lines)


def test_resume_is_bitwise(tmp_path):
    data, dev = RandomTokens(16), RandomTokens(16, seed=5)
    full = Trainer.from_config(_cfg(tmp_path / "a"), data, dev, log=lambda *_: None)
    losses_full = [s.loss for s in full.fit()]

    first = Trainer.from_config(_cfg(tmp_path / "b"), data, dev, log=lambda *_: None)
    losses = [s.loss for s in first.fit(stop_at=3)]
    path = first.save()
    second = Trainer.from_config(_cfg(tmp_path / "b"), data, dev, log=lambda *_: None)
    second.resume(path)
    losses += [s.loss for s in second.fit()]
    assert losses == losses_full  # bitwise, not approximately
    for (n, p), (_, q) in zip(full.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), n


def test_truncated_checkpoint_and_wrong_tokenizer(tmp_path):
    tr = Trainer.from_config(_cfg(tmp_path), RandomTokens(16), log=lambda *_: None,
                 tokenizer_sha256="a" * 64)
    path = tr.save()
    with pytest.raises(ckpt_lib.CheckpointError, match="does not match"):
        ckpt_lib.Checkpoint(path).check_tokenizer("b" * 64, "data/tokenizer.model")
    f = os.path.join(path, "model", "stage0.safetensors")
    before = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(before // 2)
    with pytest.raises(ckpt_lib.CheckpointError, match="corrupt or truncated"):
        ckpt_lib.Checkpoint(path)
    with pytest.raises(ckpt_lib.CheckpointError, match="does not exist"):
        ckpt_lib.Checkpoint(str(tmp_path / "nope"))


def test_failed_save_leaves_existing_checkpoint(tmp_path):
    tr = Trainer.from_config(_cfg(tmp_path), RandomTokens(16), log=lambda *_: None)
    path = tr.save()
    digest = ckpt_lib.Checkpoint(path).meta["files"]
    bad = {"x": object()}  # not a tensor: the save fails midway
    with pytest.raises(Exception):
        ckpt_lib.save_checkpoint(path, bad, {}, {"step": 99})
    ck = ckpt_lib.Checkpoint(path)  # still valid, still the old one
    assert ck.meta["files"] == digest and ck.meta["step"] == 0
