"""AdamW on flat fp32 tensors, op for op the same as torch.optim.AdamW(foreach=False).

Every op here is elementwise, so running it on a flat shard (or on any piece of one)
gives the same numbers as running it per parameter: that is what lets ZeRO update a
contiguous slice that cuts through parameters.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
           exp_avg_sq: torch.Tensor, *, step: int, lr: float, beta1: float, beta2: float,
           eps: float, weight_decay: float,
           decay_ranges: list[tuple[int, int]] | None = None) -> None:
    """One in-place AdamW update of 1-D tensors. `step` counts this update (1 on the first
    call), like torch's `state["step"]` after its increment. `decay_ranges` limits the
    decoupled weight decay to those [lo, hi) ranges of `param` (None = all of it)."""
    if weight_decay != 0:
        # a Python-float factor per range, not a per-element tensor: the same rounding as
        # torch's param.mul_(1 - lr * weight_decay)
        factor = 1 - lr * weight_decay
        for lo, hi in ([(0, param.numel())] if decay_ranges is None else decay_ranges):
            param[lo:hi].mul_(factor)
    # torch uses lerp for the first moment; mul_().add_() would differ in the last bit
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # bias corrections in Python doubles, exactly as torch computes them from step.item()
    step = float(step)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
