"""The divergence guard: stop a run whose state is going bad before it is saved.

Three signals, checked after every optimizer step on every rank (each is equal on every
rank: the loss is all-reduced, the skip decision comes from the all-reduced grad norm),
so all ranks stop at the same step without a collective of their own:

  - more than `max_skipped` optimizer steps in a row skipped for inf/nan gradients.
    fp16 loss-scale back-offs are not divergence: while the scale can still be halved a
    skipped step is the scaler doing its job, counted apart (`backoffs`); only skips at
    the minimum scale (and every skip in bf16 / fp32) count towards the limit;
  - a non-finite loss;
  - a loss above spike_factor x the mean of the recent finite losses (after a few
    steps of history, so the first steps do not trip it; 0 turns this off).

A step's loss measures the weights *before* its update, so the state after the last
update is unmeasured; before a save the trainer runs one forward of the next batch and
hands its loss to `check_state`, so the weights written have been seen to be sane (a
huge lr ruins them in one update while that update's own loss still looks normal).
The recent losses travel in the checkpoint, so a resumed run is guarded from its first
step.
"""
from __future__ import annotations

import math
from collections import deque


class DivergenceError(RuntimeError):
    """The run diverged: stop it, and save nothing of the diverged state."""


class NonFiniteLossError(DivergenceError, FloatingPointError):
    """A non-finite loss (still a FloatingPointError for callers that catch that)."""


class DivergenceGuard:
    WINDOW = 50          # steps in the running mean of the spike check
    MIN_HISTORY = 5      # steps of history before the spike check applies

    def __init__(self, max_skipped: int = 5, spike_factor: float = 0.0):
        self.max_skipped, self.spike_factor = max_skipped, spike_factor
        self.skipped_in_a_row = 0
        self.backoffs = 0             # fp16 loss-scale back-offs, not divergence
        self.recent: deque[float] = deque(maxlen=self.WINDOW)

    @property
    def in_streak(self) -> bool:
        """The last step was skipped for real divergence: not a state to save."""
        return self.skipped_in_a_row > 0

    def observe(self, step: int, loss: float, skipped: bool, backoff: bool = False):
        """Raise DivergenceError when the run should stop; `backoff`: the skip was an fp16
        loss-scale back-off (the scale was above its minimum)."""
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss} at step {step}: the run diverged "
                                     "(lower train.lr?); this state was not saved")
        if skipped and backoff:
            self.backoffs += 1
            return
        if skipped:
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row > self.max_skipped:
                raise DivergenceError(
                    f"{self.skipped_in_a_row} optimizer steps in a row skipped for inf/nan "
                    f"gradients (train.max_skipped_steps={self.max_skipped}) at step {step}: "
                    "the run diverged (lower train.lr?); the skipped steps were not saved")
            return
        self.skipped_in_a_row = 0
        mean = self._spike_over(loss)
        if mean is not None:
            raise DivergenceError(
                f"loss {loss:.4f} at step {step} is over train.loss_spike_factor="
                f"{self.spike_factor:g} x its running mean {mean:.4f}: the run diverged; "
                "this state was not saved")
        self.recent.append(loss)

    def check_state(self, step: int, loss: float):
        """The forward-only loss of the state about to be saved: refuse a non-finite one
        or a spike (not recorded in the history: it is not a training step)."""
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"checkpoint at step {step} not saved: the weights give "
                                     f"loss {loss}; the run diverged (lower train.lr?)")
        mean = self._spike_over(loss)
        if mean is not None:
            raise DivergenceError(
                f"checkpoint at step {step} not saved: the weights give loss {loss:.4g}, "
                f"over train.loss_spike_factor={self.spike_factor:g} x the running mean "
                f"{mean:.4f}; the run diverged (lower train.lr?)")

    def _spike_over(self, loss: float) -> float | None:
        """The running mean `loss` exceeds by more than spike_factor, else None (also
        while the check is off or the history is too short to judge)."""
        if self.spike_factor > 0 and len(self.recent) >= self.MIN_HISTORY:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return mean
        return None

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "backoffs": self.backoffs}

    def load_state_dict(self, state: dict):
        self.recent.clear()
        self.recent.extend(float(x) for x in state.get("recent", []))
        self.backoffs = int(state.get("backoffs", 0))
