"""One-shot check of the CUDA path on one GPU (runners/gpu_check.py, `make gpu-check`).

Sections, each guarded so a failure is recorded and the rest still run:
  kernels   every Triton kernel against the torch reference on CUDA, fp16 and bf16:
            forward and input-gradient errors, passed when no worse than the reference's
            own low-precision error (both against an fp32 reference) beyond a margin
  timings   each kernel against torch eager, SDPA (attention) and torch.compile: ms,
            TFLOP/s or GB/s, % of the device's peak, peak memory of one fwd+bwd
  training  the `base` preset, bf16 autocast, ~100 steps with kernels="triton" and
            kernels="torch": tokens/s, MFU, loss falling, peak memory
  nccl      the engine under `torchrun --nproc_per_node 1` (NCCL process group, the
            dp/ZeRO collectives, a few trainer steps)
One module per section; this one plans, runs and reports. Writes <out>/gpu_check.json
(after every section, so a killed run keeps what finished) and <out>/gpu_check.md.
Meant for the GPU machine's own python3 with PYTHONPATH=. (torch 2.11, triton 3.6
there): nothing newer than those is used.
"""
from __future__ import annotations

import json
import os
import platform
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

SECTIONS = ("kernels", "timings", "training", "nccl")


@dataclass
class Plan:
    out_dir: str = "runs/gpu_check"      # folder for gpu_check.json and gpu_check.md
    sections: tuple[str, ...] = SECTIONS  # what to run: kernels, timings, training, nccl
    train_steps: int = 100               # training section: steps per kernel backend
    train_preset: str = "base"           # training section: model preset
    train_micro_batch_size: int = 16     # training section: sequences per step
    train_seq_len: int = 1024            # training section: tokens per sequence
    timing_tokens: int = 8192            # timings section: tokens of the pointwise ops
    timing_seq_len: int = 2048           # timings section: attention sequence length
    timing_budget_s: float = 200.0       # torch.compile rows stop when it runs out
    nccl_timeout_s: float = 240.0        # nccl section: the torchrun job's deadline
    # kernel shapes: chatglm3-6b-like; head_dim 64 from the base preset
    shapes: dict = field(default_factory=lambda: {
        "hidden": 4096, "ffn": 13696, "heads": 32, "groups": 2, "head_dim": 128,
        "vocab": 65024, "check_seq": 512, "check_batch": 2})

    def __post_init__(self):
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ValueError(f"gpu_check.sections: unknown {unknown}; known: "
                             f"{', '.join(SECTIONS)}")
        if self.train_steps < 2:
            raise ValueError(f"gpu_check.train_steps={self.train_steps} must be >= 2")


def describe(plan: Plan) -> list[str]:
    """What run(plan) would do, one line each (the --dry-run output)."""
    sh = plan.shapes
    lines = [f"gpu check -> {plan.out_dir}/gpu_check.json and gpu_check.md"]
    if "kernels" in plan.sections:
        lines.append(f"kernels : rms_norm, add_rms_norm, swiglu, swiglu_linear, rotary, "
                     f"attention (d{sh['head_dim']} and d64, prefix, MQA + padding, decode),"
                     f" linear_cross_entropy (V={sh['vocab']}); fp16 and bf16 vs the torch "
                     "reference, both against fp32")
    if "timings" in plan.sections:
        lines.append(f"timings : bf16, {plan.timing_tokens} tokens (h={sh['hidden']}, "
                     f"ffn={sh['ffn']}, V={sh['vocab']}), attention s={plan.timing_seq_len} "
                     f"d={sh['head_dim']}: triton vs eager vs sdpa vs torch.compile, "
                     "triton.testing.do_bench, fwd and fwd+bwd, peak memory")
    if "training" in plan.sections:
        lines.append(f"training: preset {plan.train_preset}, precision auto (bf16 autocast), "
                     f"{plan.train_steps} steps of {plan.train_micro_batch_size}x{plan.train_seq_len} "
                     "tokens, kernels=triton then kernels=torch: tokens/s, MFU, loss, "
                     "peak memory")
    if "nccl" in plan.sections:
        from engine.gpu_check.nccl import nccl_command
        lines.append(f"nccl    : {' '.join(nccl_command('<out>/nccl.json', '<port>'))} "
                     f"(timeout {plan.nccl_timeout_s:.0f}s)")
    return lines


# ---- the run ----------------------------------------------------------------------------

def _env() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "host": platform.node()}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001
        out["triton"] = f"unavailable: {err}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=f"{p.major}.{p.minor}",
                   memory_gb=round(p.total_memory / 1e9, 1), sms=p.multi_processor_count)
    return out


def _peaks(device) -> dict:
    from engine.planner.devices import PROFILES
    from engine.timing import peak_flops
    flops, source = peak_flops(device)
    name = source.split()[0] if flops else None
    return {"flops": flops, "source": source,
            "mem_bw": PROFILES[name].mem_bw if name in PROFILES else None}


def run(plan: Plan, log=print) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("the GPU check needs a CUDA device (use --dry-run to see the plan)")
    os.makedirs(plan.out_dir, exist_ok=True)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    report = {"env": _env(), "plan": asdict(plan), "peaks": _peaks(device), "sections": {}}
    log(json.dumps(report["env"]))
    started = time.monotonic()
    for name in plan.sections:
        log(f"== {name}")
        t0 = time.monotonic()
        try:
            result = {"ok": True, **_section(name)(plan, device, report["peaks"], log)}
        except Exception as err:  # noqa: BLE001 - record it, run the rest
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                      "traceback": traceback.format_exc()[-4000:]}
            log(f"{name} failed: {result['error']}")
        result["seconds"] = round(time.monotonic() - t0, 1)
        report["sections"][name] = result
        torch.cuda.empty_cache()
        _write(plan, report)
    report["total_seconds"] = round(time.monotonic() - started, 1)
    _write(plan, report)
    return report


def _write(plan: Plan, report: dict):
    with open(os.path.join(plan.out_dir, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(plan.out_dir, "gpu_check.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report))


def _section(name: str):
    # imported when run: `python -m engine.gpu_check.nccl` must not find itself imported
    import importlib
    return getattr(importlib.import_module(f"engine.gpu_check.{name}"), f"section_{name}")


def markdown(report: dict) -> str:
    env, peaks = report.get("env", {}), report.get("peaks", {})
    lines = ["# GPU check", "",
             f"{env.get('device', '?')} (sm {env.get('capability', '?')}), torch "
             f"{env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}; peak "
             f"{(peaks.get('flops') or 0) / 1e12:.0f} TFLOP/s ({peaks.get('source')}), "
             f"{(peaks.get('mem_bw') or 0) / 1e9:.0f} GB/s", ""]
    for name, sec in report.get("sections", {}).items():
        lines.append(f"## {name}: {'ok' if sec.get('ok') else 'FAILED'} "
                     f"({sec.get('seconds', '?')} s)")
        lines.append("")
        if not sec.get("ok"):
            lines += ["```", sec.get("error", ""), "```", ""]
        if name == "kernels" and "rows" in sec:
            lines += [f"{sec['passed']} passed, {sec['failed']} failed (relative max error "
                      "vs fp32: kernel | torch in the same dtype; forward, then input grads)",
                      "", "| op | dtype | ok | kernel err | torch err |", "|---|---|---|---|---|"]
            for r in sec["rows"]:
                lines.append(f"| {r['op']} | {r['dtype']} | {'yes' if r['ok'] else 'NO'} | "
                             f"{r.get('kernel_rel_err', r.get('error', ''))} | "
                             f"{r.get('torch_rel_err', '')} |")
        elif name == "timings" and "rows" in sec:
            lines += ["| op | shape | impl | pass | ms | rate | % peak | peak MiB |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in sec["rows"]:
                rate = (f"{r['tflops']} TFLOP/s" if "tflops" in r else
                        f"{r['gbs']:.0f} GB/s" if "gbs" in r else r.get("error", ""))
                lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {r['mode']} | "
                             f"{r.get('ms', '')} | {rate} | {r.get('pct_peak', '')} | "
                             f"{r.get('peak_mib', '')} |")
        elif name == "training" and "runs" in sec:
            lines += ["| kernels | steps | tokens/s | MFU | median step ms | first step s | "
                      "loss first -> last | peak GiB |", "|---|---|---|---|---|---|---|---|"]
            for r in sec["runs"].values():
                if "error" in r:
                    lines.append(f"| {r['kernels']} | failed: {r['error'][:200]} |||||||")
                    continue
                lines.append(f"| {r['kernels']} | {r['steps']} | {r['tokens_per_s']:,} | "
                             f"{100 * r['mfu']:.1f}% | {r['median_step_ms']} | "
                             f"{r['first_step_s']} | {r['loss_first']} -> {r['loss_last']} | "
                             f"{r['peak_memory_gib']} |")
            lines += ["", f"triton / torch throughput: {sec.get('triton_over_torch')}"]
        elif name == "nccl":
            w = sec.get("worker", {})
            lines += [f"`{sec.get('command', '')}` -> exit {sec.get('returncode')}", "",
                      "```", json.dumps(w, indent=1)[:2000], "```"]
        lines.append("")
    return "\n".join(lines)
