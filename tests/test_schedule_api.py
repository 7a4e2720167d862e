"""The schedule's surface: one frozen StepContext per forward_backward call, and the
program built and checked once per (schedule, p, s, m, v, forward_only), not every step."""
import collections
import dataclasses

import pytest
import torch

from engine.pipeline import program
from engine.pipeline.schedules import StepContext, forward_backward
from model import GLM, GLMConfig
from test_pipeline_parity import count_tokens, microbatches


def _counting(calls, name, fn):
    def counted(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return counted


@pytest.fixture
def calls(monkeypatch):
    """Counts of check_schedule and _build_program calls, starting from an empty cache."""
    counts = collections.Counter()
    monkeypatch.setattr(program, "check_schedule",
                        _counting(counts, "check", program.check_schedule))
    monkeypatch.setattr(program, "_build_program",
                        _counting(counts, "build", program._build_program))
    program.cached_program.cache_clear()
    yield counts
    program.cached_program.cache_clear()


def test_program_built_and_checked_once_per_layout_over_steps(calls):
    model = GLM.build(GLMConfig.preset("tiny"), seed=0)
    mbs = microbatches(3, 0)
    step = StepContext("none", [model], mbs, count_tokens(mbs))
    losses = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        losses.append(forward_backward(step))
    assert calls == {"check": 1, "build": 1}
    assert losses[0] == losses[1] == losses[2]
    # another key (forward-only evaluation) is built once, the training one stays cached
    for _ in range(2):
        forward_backward(dataclasses.replace(step, forward_only=True))
        forward_backward(step)
    assert calls == {"check": 2, "build": 2}


def test_every_stage_program_cached_per_key(calls):
    for _ in range(2):
        for s in range(4):
            program.cached_program("1f1b", 4, s, 6, 1, False)
            program.cached_program("interleaved", 4, s, 8, 2, False)
    assert calls == {"check": 8, "build": 8}
    assert program.stage_program("1f1b", 4, 1, 6) == \
        list(program.cached_program("1f1b", 4, 1, 6, 1, False))
    assert calls == {"check": 8, "build": 8}


def test_invalid_layout_raises_on_every_call(calls):
    for _ in range(2):
        with pytest.raises(ValueError, match="needs pp >= 2"):
            forward_backward(StepContext("interleaved", [torch.nn.Linear(1, 1)] * 2,
                                         microbatches(3, 0), 1))
    assert calls["build"] == 2


def test_step_context_is_frozen():
    step = StepContext("none", [], [], 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.scale_loss = lambda loss: loss
