r"""runners/plan.py: enumerate every valid tp x pp x dp (x vpp, micro-batch size,
recompute, ZeRO stage), predict per-device memory and step time, print them best first.

    python runners/plan.py --model.preset chatglm3-6b --plan.gpus 8 --plan.memory_gb 80
    python runners/plan.py --model.preset chatglm3-6b --plan.gpus 16 --plan.memory_gb 80 \
        --plan.seq_len 8192 --plan.global_batch_size 128 --plan.device a100 --plan.top 30
    python runners/plan.py --model.preset small --plan.gpus 1 --plan.device cpu \
        --plan.threads 1 --plan.seq_len 128 --plan.global_batch_size 4 --validate

plan.device cpu measures this machine (calibrate()); named profiles are h100 and a100.
--json prints only the chosen layout as JSON on stdout (the report goes to stderr).
A runner that trains calls engine.planner.choose_layout() instead (--parallel auto)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from engine.config_cli import Alias, command

GB = 1e9


@dataclass
class PlanModel:
    preset: str = "chatglm3-6b"    # named model shape (model/config.py PRESETS)


@dataclass
class PlanConfig:
    gpus: int = 8                  # world size: devices the layouts are for
    gpus_per_node: int = 8         # devices per node (tensor parallelism stays inside one)
    memory_gb: float = 0.0         # GB per device; 0: the device profile's
    device: str = "h100"           # device profile: h100 | a100 | cpu (cpu: measured now)
    threads: int = 0               # cpu: torch threads for calibration and --validate (0:
    #                                torch's default; 1 on a shared machine)
    seq_len: int = 4096            # tokens per sequence
    global_batch_size: int = 64    # sequences per optimizer step over all data-parallel ranks
    precision: str = ""            # bf16 | fp32 ("": the device's: bf16 on GPUs, fp32 on cpu)
    kernels: str = ""              # fused | torch ("": the device's: fused on GPUs, torch on cpu)
    sequence_parallel: bool = True  # may shard norms and residual over tp (false: replicated)
    max_micro_batch_size: int = 16  # largest micro-batch size searched
    zero_stages: list[int] = field(default_factory=lambda: [0, 1, 2])  # ZeRO stages searched
    top: int = 25                  # rows to print (0: all)

    def __post_init__(self):
        if self.precision not in ("", "bf16", "fp32"):
            raise ValueError(f"plan.precision={self.precision!r} must be bf16 or fp32")
        if self.kernels not in ("", "fused", "torch"):
            raise ValueError(f"plan.kernels={self.kernels!r} must be fused or torch")
        for name in ("memory_gb", "threads", "top"):
            if getattr(self, name) < 0:
                raise ValueError(f"plan.{name}={getattr(self, name)} must be >= 0")


_OLD = {"--seq-len": "seq_len", "--global-batch": "global_batch_size", "--gpus": "gpus",
        "--gpus-per-node": "gpus_per_node", "--gpu-mem": "memory_gb", "--device": "device",
        "--threads": "threads", "--precision": "precision", "--kernels": "kernels",
        "--max-micro-batch": "max_micro_batch_size", "--zero-stages": "zero_stages",
        "--top": "top"}
COMMAND = command(
    __doc__, {"model": PlanModel, "plan": PlanConfig},
    flags={"--json": "print only the chosen layout as JSON on stdout (the report goes to "
                     "stderr)",
           "--validate": "(single device) run every printed layout here, compare memory "
                         "and step time with the prediction"},
    aliases={"--model": Alias("model.preset"),
             "--no-sequence-parallel": Alias("plan.sequence_parallel", switch=True,
                                             value=False),
             **{k: Alias(f"plan.{v}") for k, v in _OLD.items()}})


def _validate(req, cands, out):
    from engine.planner.measure import measure_layouts
    runnable = [c for c in cands if (c.layout.tp, c.layout.pp, c.layout.dp) == (1, 1, 1)]
    got = measure_layouts([(req, c.layout) for c in runnable])
    print(f"\n{'layout':<30} {'pred MB':>9} {'meas MB':>9} {'err':>7} {'act pred':>9} "
          f"{'act meas':>9} {'pred s':>8} {'meas s':>8}", file=out)
    for c, g in zip(runnable, got):
        pm = c.memory.peak
        pred = pm.states_and_activations
        print(f"{c.layout.short():<30} {pred / 1e6:>9.2f} {g.total / 1e6:>9.2f} "
              f"{pred / g.total - 1:>+7.2%} {pm.activations / 1e6:>9.2f} "
              f"{g.activations / 1e6:>9.2f} {c.time.total:>8.3f} {g.step_time:>8.3f}",
              file=out)


def run(config, json: bool = False, validate: bool = False):   # noqa: A002 - the flag's name
    from engine.planner import PlanRequest, best, device_profile, format_table, plan
    from engine.planner.explain import LEGEND, launch_flags
    pc = config.plan
    if pc.threads:
        import torch
        torch.set_num_threads(pc.threads)
    dev = device_profile(pc.device)
    req = PlanRequest(
        config.model.preset, pc.gpus, pc.memory_gb or dev.memory_bytes / GB,
        pc.seq_len, pc.global_batch_size, gpus_per_node=pc.gpus_per_node,
        precision=pc.precision or dev.precision, kernels=pc.kernels or dev.kernels,
        sequence_parallel=pc.sequence_parallel, max_micro_batch=pc.max_micro_batch_size,
        zero_stages=tuple(pc.zero_stages))
    cands = plan(req, dev)
    n_fit = sum(c.fits for c in cands)
    # --json: stdout carries the JSON alone (for a pipe or a script); the report goes to stderr
    out = sys.stderr if json else sys.stdout
    print(f"{req.model_name or 'model'}: {pc.gpus} x {req.device_memory_gb:.4g} GB "
          f"({dev.name}, {dev.reserved_bytes / GB:g} GB reserved), seq {req.seq_len}, "
          f"global batch {req.global_batch}, {req.precision} / {req.kernels} kernels: "
          f"{len(cands)} valid layouts, {n_fit} fit", file=out)
    print(format_table(cands, top=pc.top or None), file=out)
    print("\n" + LEGEND, file=out)
    chosen = best(cands)
    t = chosen.time
    print(f"\nchosen: {chosen.layout.short()}  ({chosen.memory.peak.total / GB:.1f} GB on "
          f"stage {chosen.memory.peak.stage}; step {t.total:.3f} s = gemm {t.gemm:.3f} + "
          f"elementwise {t.elementwise:.3f} + overhead {t.overhead:.3f} + tp {t.tp:.3f} + "
          f"p2p {t.p2p:.3f} + bubble {t.bubble:.3f} + dp {t.dp:.3f} + optimizer "
          f"{t.optimizer:.3f}; {t.tokens_per_s:,.0f} tokens/s)", file=out)
    nodes = -(-pc.gpus // pc.gpus_per_node)
    where = f" (the same line on each of the {nodes} nodes)" if nodes > 1 else ""
    flags = launch_flags(chosen.layout, req.seq_len, req.model_name or None,
                         gpus_per_node=pc.gpus_per_node)
    print(f"\nto train with it{where}:\n{flags}", file=out)
    if json:
        import json as json_lib
        print(json_lib.dumps(chosen.layout.as_dict()))
    if validate:
        _validate(req, cands[:pc.top] if pc.top else cands, out)


def main(argv=None):
    return COMMAND.main(run, argv)
