"""engine/train/metrics.py: the log line, metrics.jsonl records, TensorBoard events and
the parameter-count header."""
import json
import re
from types import SimpleNamespace

import pytest
import torch

from engine.parallel.state import ParallelState
from engine.train import metrics as metrics_lib
from engine.train.trainer import Trainer
from model import GLM, GLMConfig
from test_trainer import RandomTokens, _cfg

OLD_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "seconds", "tokens_per_s",
            "flops_per_s"}
NEW_KEYS = {"loss_avg", "tokens_seen", "memory_gib", "elapsed_s", "eta_s", "time"}
LINE = re.compile(r"^\d\d:\d\d:\d\d step +(\d+)/8 \| loss ([\d.]+) \| lr [\d.e+-]+ \| gnorm "
                  r"[\d.]+ \| [\d,]+ tok/s \| tokens ([\d,]+) \| mem [\d.]+ GiB (rss|peak)"
                  r"( \| MFU [\d.]+%)? \| elapsed \d+s \| ETA \d+s$")


def test_log_line_averages_the_window_and_counts_tokens(tmp_path):
    lines = []
    tr = Trainer.from_config(_cfg(tmp_path, steps=8, log_every=4, eval_every=0), RandomTokens(16, 64),
                 log=lines.append)
    hist = tr.fit()
    steps = [ln for ln in lines if " step " in ln and "/8" in ln]
    assert len(steps) == 2, lines
    records = [json.loads(x) for x in open(tr.metrics_path)]
    assert len(records) == 8
    for ln, last in zip(steps, (4, 8)):
        m = LINE.match(ln)
        assert m, ln
        window = [h.loss for h in hist[last - 4:last]]
        assert int(m.group(1)) == last
        assert float(m.group(2)) == pytest.approx(sum(window) / 4, abs=1e-4)
        # the window mean, not the last step's value (the check can fail)
        assert abs(sum(window) / 4 - hist[last - 1].loss) > 1e-4
        assert int(m.group(3).replace(",", "")) == sum(h.tokens for h in hist[:last])
        rec = records[last - 1]
        assert OLD_KEYS | NEW_KEYS <= set(rec)
        assert rec["loss_avg"] == pytest.approx(sum(window) / 4)
        assert rec["tokens_seen"] == sum(h.tokens for h in hist[:last])
    assert records[-1]["eta_s"] == 0 and records[3]["eta_s"] > 0
    assert set(records[0]) == OLD_KEYS - {"tokens_per_s", "flops_per_s"}   # not a log step


def test_tokens_seen_survives_a_resume(tmp_path):
    data = RandomTokens(16)
    full = Trainer.from_config(_cfg(tmp_path / "a", eval_every=0), data, log=lambda *_: None)
    full.fit()
    first = Trainer.from_config(_cfg(tmp_path / "b", eval_every=0), data, log=lambda *_: None)
    first.fit(stop_at=3)
    path = first.save()
    second = Trainer.from_config(_cfg(tmp_path / "b", eval_every=0), data, log=lambda *_: None)
    second.resume(path)
    second.fit()
    assert second.metrics.tokens_seen == full.metrics.tokens_seen > 0


def test_tensorboard_missing_is_a_one_line_error(tmp_path, monkeypatch):
    real = metrics_lib.importlib.util.find_spec
    monkeypatch.setattr(metrics_lib.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ValueError, match=r"train.tensorboard=true needs the optional "
                                         r"tensorboard package: pip install"):
        Trainer.from_config(_cfg(tmp_path, tensorboard=True), RandomTokens(16), log=lambda *_: None)
    with pytest.raises(ValueError, match="train.tensorboard='yes' must be true or false"):
        _cfg(tmp_path, tensorboard="yes")


def test_tensorboard_events_hold_the_metrics_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tr = Trainer.from_config(_cfg(tmp_path, tensorboard=True, log_every=2), RandomTokens(16),
                 RandomTokens(16, seed=9), log=lambda *_: None)
    tr.fit()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    records = [json.loads(x) for x in open(tr.metrics_path)]
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "loss_avg", "dev_loss"} <= tags
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"])) for r in records]
    dev = [(e.step, e.value) for e in acc.Scalars("dev_loss")]
    assert dev == [(r["step"], pytest.approx(r["dev_loss"]))
                   for r in records if "dev_loss" in r]


def test_params_line_names_whole_model_and_this_rank():
    cfg = GLMConfig.preset("tiny")
    model = GLM.build(cfg)
    named = list(model.named_parameters())
    whole = model.num_params()
    single = ParallelState.single()
    assert metrics_lib.params_line(cfg, named, single) == f"{whole:,} parameters (whole model)"
    half = [(n, p) for n, p in named if "layers.0." in n]      # a pipeline stage's share
    state = SimpleNamespace(rank=1, dims=SimpleNamespace(world_size=2), distributed=True)
    line = metrics_lib.params_line(cfg, half, state)
    assert line == (f"{whole:,} parameters (whole model), "
                    f"{sum(p.numel() for _, p in half):,} on this rank (rank 1 of 2)")


def test_peak_memory_on_cpu_is_the_rss():
    gib, kind = metrics_lib.peak_memory("cpu")
    assert kind == "rss" and 0.01 < gib < 1024
    torch.zeros(1)
