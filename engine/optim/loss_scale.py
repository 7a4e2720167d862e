"""Dynamic loss scaling for fp16: keep small gradients above fp16's underflow by scaling
the loss, and back off when the scaled gradients overflow.

    overflow (inf/nan anywhere, agreed across ranks) -> skip the step, scale /= 2
    growth_interval clean steps in a row             -> scale *= 2
"""
from __future__ import annotations


class DynamicLossScaler:
    def __init__(self, initial: float, min_scale: float, growth_interval: int):
        self.scale = float(initial)
        self.min_scale = float(min_scale)
        self.growth_interval = growth_interval
        self.clean_steps = 0        # consecutive unskipped steps since the last change

    def update(self, found_inf: bool):
        if found_inf:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"loss_scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict):
        self.scale = float(state["loss_scale"])
        self.clean_steps = int(state.get("clean_steps", 0))
