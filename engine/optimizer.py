"""Where DESIGN.md puts the optimizer; the pieces live in engine/optim/."""
from engine.optim import (DistributedOptimizer, OptimConfig, StepResult,  # noqa: F401
                          merge_shards)

__all__ = ["DistributedOptimizer", "OptimConfig", "StepResult", "merge_shards"]
