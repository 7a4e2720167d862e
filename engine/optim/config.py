"""OptimConfig: everything the distributed optimizer needs to know, validated up front."""
from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class OptimConfig:
    lr: float = 1e-3                    # default only: step(lr=...) takes the scheduler's value
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0           # decoupled (AdamW): p -= lr * wd * p before the update
    decay_1d_params: bool = False       # False: norms and biases (ndim < 2) get no decay
    max_grad_norm: float = 1.0          # global L2 clip over every rank's gradients; 0 = off
    zero_stage: int = 1                 # 0 replicated, 1 shard states, 2 also shard grads
    bucket_mb: float = 25.0             # gradient bucket size for the dp reduction
    precision: str = "fp32"             # model params/grads dtype; master weights are fp32
    grad_dtype: str = "param"           # "param" or "fp32": accumulate + reduce grads in fp32
    initial_loss_scale: float = 2.0 ** 16   # fp16 only
    min_loss_scale: float = 1.0
    growth_interval: int = 1000         # clean steps before the fp16 loss scale doubles

    def __post_init__(self):
        if not isinstance(self.lr, (int, float)) or self.lr < 0:
            raise ValueError(f"lr={self.lr!r} must be a number >= 0")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={self.betas!r} must be two numbers in [0, 1)")
        self.betas = (float(betas[0]), float(betas[1]))
        if self.eps <= 0:
            raise ValueError(f"eps={self.eps} must be positive")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 = no clipping)")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage={self.zero_stage!r} must be 0, 1 or 2")
        if not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb={self.bucket_mb} must be positive")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of "
                             f"{', '.join(PRECISIONS)}")
        if self.grad_dtype not in ("param", "fp32"):
            raise ValueError(f"grad_dtype={self.grad_dtype!r} must be 'param' or 'fp32'")
        if not self.min_loss_scale > 0:
            raise ValueError(f"min_loss_scale={self.min_loss_scale} must be positive")
        if not self.initial_loss_scale >= self.min_loss_scale:
            raise ValueError(f"initial_loss_scale={self.initial_loss_scale} must be >= "
                             f"min_loss_scale={self.min_loss_scale}")
        if (not isinstance(self.growth_interval, int) or isinstance(self.growth_interval, bool)
                or self.growth_interval <= 0):
            raise ValueError(f"growth_interval={self.growth_interval!r} must be a positive "
                             "integer")

    @property
    def param_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def reduce_dtype(self) -> torch.dtype:
        return torch.float32 if self.grad_dtype == "fp32" else self.param_dtype
