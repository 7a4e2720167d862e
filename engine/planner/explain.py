"""What runners/plan.py's table means, and the flags that build its chosen layout.

The layout column reads `tp2 pp4 dp1 v2 mbs2x4 rc z1 sp zb`; LEGEND says what each
token is. `launch_flags` turns a Layout into the torchrun line and the `--section.field`
overrides a training runner takes (engine/config.py), so the plan can be pasted as is.
"""
from __future__ import annotations

from engine.planner.layouts import Layout

LEGEND = """\
layout: tpN tensor-parallel ways | ppN pipeline stages | dpN data-parallel replicas |
        vN virtual stages per pipeline rank (interleaved 1F1B) |
        mbsMxK micro-batch size M, K microbatches per dp rank and step |
        rc full activation recompute | zN ZeRO stage N (optimizer states, +gradients
        at 2, sharded over dp) | sp sequence parallelism | zb zero-bubble ZB-H1 schedule
fits:   predicted peak memory <= the device's minus its reserve (NO: out of memory)
mem GB: predicted peak per device, split param/grad/optim/act/work(space) GB
step s: predicted seconds per optimizer step = comp (matmul + elementwise + host
        overhead) + comm (exposed tp + p2p + dp) + pipeline fill/drain + optimizer;
        bubble: the schedule's idle share (p-1)/(v*m+p-1); tok/s: tokens per second
*:      the chosen layout, the fastest that fits"""


def launch_flags(layout: Layout, seq_len: int | None = None, model: str | None = None,
                 runner: str = "runners/pretrain.py", gpus_per_node: int | None = None) -> str:
    """The command line (torchrun + overrides) that trains with `layout`; over several
    nodes, the line each node runs (torchrun's rendezvous flags left to the reader)."""
    world = layout.tp * layout.pp * layout.dp
    per_node = min(world, gpus_per_node or world)
    nodes = -(-world // per_node)
    launcher = (f"torchrun --nnodes {nodes} --nproc_per_node {per_node} "
                "--rdzv_backend c10d --rdzv_endpoint HOST:PORT" if nodes > 1 else
                f"torchrun --nproc_per_node {world}")
    flags = [f"--parallel.tp {layout.tp}", f"--parallel.pp {layout.pp}",
             f"--parallel.dp {layout.dp}"]
    if layout.pp > 1:
        flags.append(f"--parallel.schedule {layout.schedule}")
    if layout.vpp > 1:
        flags.append(f"--parallel.vpp {layout.vpp}")
    if layout.sequence_parallel:
        flags.append("--parallel.sequence_parallel true")
    if layout.zero_stage:
        flags.append(f"--parallel.zero_stage {layout.zero_stage}")
    flags += [f"--train.micro_batch_size {layout.micro_batch_size}",
              f"--train.num_microbatches {layout.num_microbatches}"]
    if layout.recompute:
        flags.append("--train.recompute true")
    if seq_len is not None:
        flags.append(f"--train.seq_len {seq_len}")
    if model:
        flags.insert(0, f"--model.preset {model}")
    return (f"{launcher} {runner} --config YOUR_CONFIG.json \\\n    "
            + " \\\n    ".join(" ".join(flags[i:i + 3]) for i in range(0, len(flags), 3)))
