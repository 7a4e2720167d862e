"""The pipeline schedule names: the one list engine.config validates against and
engine.pipeline.program builds programs for (kept free of torch so configs load cheaply)."""

# "none": gradient accumulation on one stage; "zb-h1": 1F1B with the backward split into
# B (input gradients) and W (weight gradients), Qi et al., "Zero Bubble Pipeline
# Parallelism" (ICLR 2024); "zb-v": two chunks per rank in a V, split backward
# (engine.pipeline.zbv)
SCHEDULES = ("none", "gpipe", "1f1b", "interleaved", "zb-h1", "zb-v")

# schedules whose backward is split into B and W (engine.pipeline.split_backward)
SPLIT_BACKWARD = ("zb-h1", "zb-v")
