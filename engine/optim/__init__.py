"""The distributed optimizer, one job per file:

    config.py        OptimConfig
    layout.py        flat index space -> buckets and per-rank shards (pure math)
    grad_buckets.py  gradient hooks, no_sync, bucketed async dp reduction
    adamw.py         AdamW on flat fp32 tensors (torch.optim.AdamW numerics)
    loss_scale.py    fp16 dynamic loss scaling
    distributed.py   DistributedOptimizer: ZeRO 0/1/2, master weights, clipping, step
    state.py         layout-free checkpoints and re-sharding
"""
from engine.optim.adamw import adamw_
from engine.optim.config import OptimConfig
from engine.optim.distributed import DistributedOptimizer, StepResult
from engine.optim.layout import FlatLayout
from engine.optim.state import merge_shards

__all__ = ["DistributedOptimizer", "FlatLayout", "OptimConfig", "StepResult", "adamw_",
           "merge_shards"]
