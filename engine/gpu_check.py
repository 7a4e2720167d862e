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
Writes <out>/gpu_check.json (after every section, so a killed run keeps what finished)
and <out>/gpu_check.md. Meant for the GPU machine's own python3 with PYTHONPATH=. (torch
2.11, triton 3.6 there): nothing newer than those is used.
"""
from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

SECTIONS = ("kernels", "timings", "training", "nccl")


@dataclass
class Plan:
    out_dir: str = "runs/gpu_check"
    sections: tuple[str, ...] = SECTIONS
    train_steps: int = 100
    train_preset: str = "base"
    train_batch: int = 16
    train_seq: int = 1024
    timing_tokens: int = 8192
    timing_seq: int = 2048
    timing_budget_s: float = 200.0       # torch.compile rows stop when it runs out
    nccl_timeout_s: float = 240.0
    shapes: dict = field(default_factory=lambda: {
        # chatglm3-6b-like kernel shapes; head_dim 64 from the base preset
        "hidden": 4096, "ffn": 13696, "heads": 32, "groups": 2, "head_dim": 128,
        "vocab": 65024, "check_seq": 512, "check_batch": 2})

    def __post_init__(self):
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ValueError(f"sections: unknown {unknown}; known: {', '.join(SECTIONS)}")
        if self.train_steps < 2:
            raise ValueError(f"train_steps={self.train_steps} must be >= 2")


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
                     f"ffn={sh['ffn']}, V={sh['vocab']}), attention s={plan.timing_seq} "
                     f"d={sh['head_dim']}: triton vs eager vs sdpa vs torch.compile, "
                     "triton.testing.do_bench, fwd and fwd+bwd, peak memory")
    if "training" in plan.sections:
        lines.append(f"training: preset {plan.train_preset}, precision auto (bf16 autocast), "
                     f"{plan.train_steps} steps of {plan.train_batch}x{plan.train_seq} "
                     "tokens, kernels=triton then kernels=torch: tokens/s, MFU, loss, "
                     "peak memory")
    if "nccl" in plan.sections:
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
            result = {"ok": True, **_SECTION_FNS[name](plan, device, report["peaks"], log)}
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


# ---- (1) kernels against the references --------------------------------------------------

def _errors(fn, inputs, grad_outs):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, leaves, grad_outs)
    return [o.float() for o in outs] + [g.float() for g in grads]


def _kernel_cases(dt, device, sh):
    from kernels import cross_entropy, flash_attention, reference as ref, rms_norm, rotary, swiglu
    s, b, h, f = sh["check_seq"], sh["check_batch"], sh["hidden"], sh["ffn"]
    nh, ng, d, vocab = sh["heads"], sh["groups"], sh["head_dim"], sh["vocab"]
    g = torch.Generator(device="cpu").manual_seed(0)

    def leaf(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).to(device, dt)

    pos = torch.randint(0, s, (b, s), generator=g).to(device)
    pre = torch.tensor([0, s // 2] + [s] * (b - 2))[:b].to(device)
    pad = torch.tensor([s // 8] + [0] * (b - 1)).to(device)
    labels = torch.randint(0, vocab, (s * b,), generator=g).to(device)
    labels[::7] = -100

    def rot(dim):
        return [t.transpose(0, 1).unsqueeze(2)
                for t in ref.rotary_angles(pos, pos % 5, dim, 10000.0)]

    cases = [
        ("rms_norm", lambda x, w: rms_norm.rms_norm(x, w, 1e-5),
         lambda x, w: ref.rms_norm(x, w, 1e-5), (leaf(s, b, h), leaf(h, scale=0.1, offset=1))),
        ("add_rms_norm", lambda x, r, w: rms_norm.add_rms_norm(x, r, w, 1e-5),
         lambda x, r, w: ref.add_rms_norm(x, r, w, 1e-5),
         (leaf(s, b, h), leaf(s, b, h), leaf(h, scale=0.1, offset=1))),
        ("swiglu", swiglu.swiglu, ref.swiglu, (leaf(s * b, 2 * f),)),
        ("swiglu_linear", swiglu.swiglu_linear, ref.swiglu_linear,
         (leaf(s * b, h), leaf(2 * f, h, scale=h ** -0.5))),
    ]
    for dim in (d, 64):
        cos, sin = rot(dim)
        cases.append((f"rotary d{dim}", rotary.apply_rotary, ref.apply_rotary,
                      (leaf(s, b, nh, dim), cos, sin)))
        cases.append((f"attention d{dim} prefix",
                      lambda q, k, v: flash_attention.attention(q, k, v, pre),
                      lambda q, k, v: ref.attention(q, k, v, pre),
                      (leaf(b, nh, s, dim), leaf(b, ng, s, dim), leaf(b, ng, s, dim))))
    cases += [
        ("attention mqa+pad", lambda q, k, v: flash_attention.attention(q, k, v, pre // 2, pad),
         lambda q, k, v: ref.attention(q, k, v, pre // 2, pad),
         (leaf(b, nh, s, d), leaf(b, 1, s, d), leaf(b, 1, s, d))),
        ("attention decode",
         lambda q, k, v: flash_attention.attention(q, k, v, pre, pre // 4, s - 1),
         lambda q, k, v: ref.attention(q, k, v, pre, pre // 4, s - 1),
         (leaf(b, nh, 1, d), leaf(b, ng, s, d), leaf(b, ng, s, d))),
        ("linear_cross_entropy",
         lambda x, w: cross_entropy.linear_cross_entropy(x, w, labels),
         lambda x, w: ref.linear_cross_entropy(x, w, labels),
         (leaf(s * b, h), leaf(vocab, h, scale=h ** -0.5))),
    ]
    return cases


def section_kernels(plan, device, peaks, log) -> dict:
    rows, failed = [], 0
    for dt in (torch.float16, torch.bfloat16):
        for name, fn, fn_ref, inputs in _kernel_cases(dt, device, plan.shapes):
            row = {"op": name, "dtype": str(dt).replace("torch.", "")}
            try:
                def prep(cast, inputs=inputs, name=name):
                    # rotary's cos/sin stay fp32, as the model passes them
                    return tuple(t.detach().to(cast).requires_grad_()
                                 if t.is_floating_point() and _differentiable(name, i) else t
                                 for i, t in enumerate(inputs))
                low = prep(dt)
                with torch.no_grad():
                    probe = fn(*low)
                probe = probe if isinstance(probe, tuple) else (probe,)
                gen = torch.Generator(device=device.type).manual_seed(1)
                grad_outs = tuple(torch.randn(o.shape, generator=gen, device=device, dtype=dt)
                                  for o in probe)
                got = _errors(fn, low, grad_outs)
                base = _errors(fn_ref, prep(dt), grad_outs)
                exact = _errors(fn_ref, prep(torch.float32),
                                tuple(x.float() for x in grad_outs))
                scale = [max(e.abs().max().item(), 1e-30) for e in exact]
                err_k = [(a - e).abs().max().item() / sc for a, e, sc in zip(got, exact, scale)]
                err_r = [(a - e).abs().max().item() / sc for a, e, sc in zip(base, exact, scale)]
                floor = 1e-2 if dt == torch.bfloat16 else 2e-3
                ok = all(k <= max(2.0 * r, floor) and math.isfinite(k)
                         for k, r in zip(err_k, err_r))
                row.update(ok=ok, kernel_rel_err=[float(f"{x:.3g}") for x in err_k],
                           torch_rel_err=[float(f"{x:.3g}") for x in err_r])
            except Exception as err:  # noqa: BLE001
                row.update(ok=False, error=f"{type(err).__name__}: {err}"[:500])
            failed += not row["ok"]
            log(json.dumps(row))
            rows.append(row)
    return {"rows": rows, "failed": failed, "passed": len(rows) - failed}


def _differentiable(name: str, i: int) -> bool:
    """Which inputs get gradients: all but rotary's cos/sin."""
    return not (name.startswith("rotary") and i > 0)


# ---- (2) kernel timings ------------------------------------------------------------------

def _bench_ms(fn, grads=None) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grads,
                                         return_mode="median"))


def _timing_cases(plan, device):
    import torch.nn.functional as F
    from kernels import cross_entropy, flash_attention, reference as ref, rms_norm, rotary, swiglu
    sh, n, dt = plan.shapes, plan.timing_tokens, torch.bfloat16
    h, f, vocab = sh["hidden"], sh["ffn"], sh["vocab"]
    nh, ng, d, s = sh["heads"], sh["groups"], sh["head_dim"], plan.timing_seq
    e = 2

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dt).requires_grad_()

    x, r, w = leaf(n, h), leaf(n, h), leaf(h, scale=0.1)
    gu = leaf(n, 2 * f)
    w1, w2 = leaf(2 * f, h, scale=h ** -0.5), leaf(h, f, scale=f ** -0.5)
    q = leaf(n, 1, nh, d)
    pos = torch.arange(n, device=device).view(1, n)
    cos, sin = (t.transpose(0, 1).unsqueeze(2) for t in ref.rotary_angles(pos, pos // 7, d,
                                                                            10000.0))
    qa, ka, va = leaf(1, nh, s, d), leaf(1, ng, s, d), leaf(1, ng, s, d)
    pre = torch.zeros(1, device=device, dtype=torch.long)
    wv = leaf(vocab, h, scale=h ** -0.5)
    labels = torch.randint(0, vocab, (n,), device=device)
    attn_fwd = 4 * d * (s * (s + 1) // 2) * nh          # causal: visible pairs only
    ffn_flops = 2 * n * h * 3 * f

    def fused_ffn(a, b, c):
        return F.linear(swiglu.swiglu_linear(a, b), c)

    def eager_ffn(a, b, c):
        return F.linear(ref.swiglu(F.linear(a, b)), c)

    return [
        ("rms_norm", f"[{n}, {h}]", (x, w), {"fwd": 2 * n * h * e, "fwd+bwd": 5 * n * h * e},
         None, {"triton": lambda a, b: rms_norm.rms_norm(a, b, 1e-5),
                "eager": lambda a, b: ref.rms_norm(a, b, 1e-5)}, ref.rms_norm, (1e-5,)),
        ("add_rms_norm", f"[{n}, {h}]", (x, r, w),
         {"fwd": 4 * n * h * e, "fwd+bwd": 8 * n * h * e}, None,
         {"triton": lambda a, b, c: rms_norm.add_rms_norm(a, b, c, 1e-5),
          "eager": lambda a, b, c: ref.add_rms_norm(a, b, c, 1e-5)}, ref.add_rms_norm, (1e-5,)),
        ("swiglu", f"[{n}, {2 * f}]", (gu,), {"fwd": 3 * n * f * e, "fwd+bwd": 8 * n * f * e},
         None, {"triton": swiglu.swiglu, "eager": ref.swiglu}, ref.swiglu, ()),
        ("rotary", f"[{n}, 1, {nh}, {d}]", (q, cos, sin),
         {"fwd": 2 * q.numel() * e + n * d * 4, "fwd+bwd": 4 * q.numel() * e + 2 * n * d * 4},
         None, {"triton": rotary.apply_rotary, "eager": ref.apply_rotary}, ref.apply_rotary, ()),
        ("ffn", f"[{n}, {h}] f={f}", (x, w1, w2), None,
         {"fwd": ffn_flops, "fwd+bwd": 3 * ffn_flops},
         {"triton": fused_ffn, "eager": eager_ffn}, eager_ffn, ()),
        ("attention", f"causal s{s} h{nh}/{ng} d{d}", (qa, ka, va, pre), None,
         {"fwd": attn_fwd, "fwd+bwd": 3.5 * attn_fwd},
         {"triton": lambda a, b, c, p: flash_attention.attention(a, b, c, p),
          "eager": lambda a, b, c, p: ref.attention(a, b, c, p),
          "sdpa": lambda a, b, c, p: F.scaled_dot_product_attention(
              a, b, c, is_causal=True, enable_gqa=True)},
         lambda a, b, c, p: ref.attention(a, b, c, p), ()),
        ("linear_cross_entropy", f"[{n}, {h}] V={vocab}", (x, wv, labels), None,
         {"fwd": 2 * n * h * vocab, "fwd+bwd": 6 * n * h * vocab},
         {"triton": cross_entropy.linear_cross_entropy, "eager": ref.linear_cross_entropy},
         ref.linear_cross_entropy, ()),
    ]


def _step_peak_mib(step, device):
    """Memory one call of step() needs above what was allocated before it (CUDA)."""
    if device.type != "cuda":
        return None
    _reset_peak(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - before) / 2 ** 20, 1)


def section_timings(plan, device, peaks, log) -> dict:
    deadline = time.monotonic() + plan.timing_budget_s
    rows = []
    peak_f, peak_b = peaks.get("flops"), peaks.get("mem_bw")
    for op, shape, inputs, nbytes, flops, impls, compile_ref, extra in _timing_cases(plan,
                                                                                    device):
        impls = dict(impls)
        if time.monotonic() < deadline - 60:   # a compile of fwd+bwd can take ~30-60 s
            compiled = torch.compile(compile_ref, dynamic=False)
            impls["compile"] = (lambda *a, c=compiled, x=extra: c(*a, *x))
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        for impl, fn in impls.items():
            for mode in ("fwd", "fwd+bwd"):
                row = {"op": op, "shape": shape, "impl": impl, "mode": mode}
                try:
                    if mode == "fwd":
                        def step(fn=fn):
                            with torch.no_grad():
                                fn(*inputs)
                    else:
                        probe = fn(*inputs)
                        outs = probe if isinstance(probe, tuple) else (probe,)
                        grad_outs = tuple(torch.randn_like(o) if o.is_floating_point()
                                          else None for o in outs)
                        del probe, outs

                        def step(fn=fn, grad_outs=grad_outs):
                            o = fn(*inputs)
                            o = o if isinstance(o, tuple) else (o,)
                            pairs = [(a, g) for a, g in zip(o, grad_outs) if g is not None]
                            torch.autograd.backward([a for a, _ in pairs],
                                                    [g for _, g in pairs])
                    ms = _bench_ms(step, leaves if mode != "fwd" else None)
                    row.update(ms=round(ms, 4), peak_mib=_step_peak_mib(step, device))
                    if flops is not None:
                        rate = flops[mode] / (ms / 1e3)
                        row.update(tflops=round(rate / 1e12, 1),
                                   pct_peak=round(100 * rate / peak_f, 1) if peak_f else None)
                    else:
                        rate = nbytes[mode] / (ms / 1e3)
                        row.update(gbs=round(rate / 1e9, 0),
                                   pct_peak=round(100 * rate / peak_b, 1) if peak_b else None)
                except Exception as err:  # noqa: BLE001 - e.g. eager out of memory
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                for t in leaves:
                    t.grad = None
                log(json.dumps(row))
                rows.append(row)
    return {"rows": rows}


# ---- (3) training -----------------------------------------------------------------------

class _Patterns:
    """Learnable synthetic data: each row counts up by a fixed stride from a random start
    (mod 1000), so the loss falls quickly when the model learns the stride."""

    def __init__(self, seq_len: int, seed: int = 0):
        self.seq_len, self.seed = seq_len, seed

    def get_batch(self, index: int, batch_size: int) -> dict:
        from model.masks import causal_example, collate
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start = torch.randint(0, 1000, (batch_size, 1), generator=g)
        stride = torch.randint(1, 8, (batch_size, 1), generator=g)
        rows = (start + stride * torch.arange(self.seq_len + 1)) % 1000 + 10
        return collate([causal_example(r.tolist()) for r in rows], self.seq_len, pad_id=0)


def _train(plan, device, kernels: str, out_dir: str, log) -> dict:
    from engine.config import build_run_config
    from engine.trainer import Trainer
    cfg = build_run_config({
        "model": {"preset": plan.train_preset, "kernels": kernels},
        "train": {"steps": plan.train_steps, "micro_batch_size": plan.train_batch,
                  "num_microbatches": 1, "seq_len": plan.train_seq, "lr": 1e-3,
                  "min_lr": 1e-4, "warmup_steps": 10, "log_every": 10, "eval_every": 0,
                  "precision": "auto", "out_dir": out_dir}})
    _reset_peak(device)
    tr = Trainer(cfg, _Patterns(plan.train_seq), device=device, log=log)
    hist = tr.fit()
    timed = hist[1:]   # step 1 includes the Triton JIT compiles
    tokens = sum(h.tokens for h in timed)
    seconds = sum(h.seconds for h in timed)
    tps = tokens / seconds
    losses = [h.loss for h in hist]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {"kernels": kernels, "steps": len(hist), "tokens_per_s": round(tps),
            "mfu": round(tr.mfu(tps) or 0.0, 4), "first_step_s": round(hist[0].seconds, 2),
            "median_step_ms": round(1e3 * sorted(h.seconds for h in timed)[len(timed) // 2], 2),
            "loss_first": round(first, 4), "loss_last": round(last, 4),
            "loss_falls": last < first - 0.5,
            "peak_memory_gib": _peak_gib(device)}


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)


def section_training(plan, device, peaks, log) -> dict:
    runs = {}
    for kernels in ("triton", "torch"):
        try:
            runs[kernels] = _train(plan, device, kernels,
                                   os.path.join(plan.out_dir, f"train_{kernels}"), log)
        except Exception as err:  # noqa: BLE001 - the other variant still runs
            runs[kernels] = {"kernels": kernels, "error": f"{type(err).__name__}: {err}"[:800],
                             "traceback": traceback.format_exc()[-3000:]}
        log(json.dumps(runs[kernels]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    t, e = runs["triton"].get("tokens_per_s"), runs["torch"].get("tokens_per_s")
    return {"runs": runs, "triton_over_torch": round(t / e, 3) if t and e else None}


# ---- (4) the NCCL path, under torchrun ---------------------------------------------------

def nccl_command(path: str, port) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "engine.gpu_check", "--nccl-worker", path]


def section_nccl(plan, device, peaks, log) -> dict:
    path = os.path.abspath(os.path.join(plan.out_dir, "nccl.json"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = nccl_command(path, port)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=plan.nccl_timeout_s)
    out = {"command": " ".join(cmd), "returncode": proc.returncode,
           "seconds": round(time.monotonic() - t0, 1),
           "output_tail": (proc.stdout + proc.stderr)[-3000:]}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            out["worker"] = json.load(f)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return out


def nccl_worker(path: str):
    """Runs under torchrun (one process): the engine's NCCL group, its collectives and
    a few trainer steps with a ParallelState."""
    import torch.distributed as dist
    from engine.config import build_run_config
    from engine.optim import collectives
    from engine.p2p import wait_all
    from engine.parallel import ParallelDims, init_distributed
    from engine.timing import synchronize
    from engine.trainer import Trainer
    result = {}
    state = init_distributed(ParallelDims(), timeout=120, num_layers=2)
    try:
        result["backend"] = dist.get_backend()
        result["device"] = str(state.device)
        x = torch.arange(8, dtype=torch.float32, device=state.device)
        work = dist.all_reduce(x, async_op=True)
        wait_all([work], state, "all_reduce", [[0]])
        out = torch.empty(8, device=state.device)
        collectives.reduce_scatter(out, x, dist.group.WORLD).wait()
        got = torch.empty(8, device=state.device)
        collectives.all_gather(got, out, dist.group.WORLD).wait()
        synchronize(state.device)
        result["collectives_ok"] = bool(torch.equal(got.cpu(), torch.arange(8.0)))
        cfg = build_run_config({
            "model": {"preset": "tiny"}, "parallel": {"zero_stage": 2},
            "train": {"steps": 5, "micro_batch_size": 4, "num_microbatches": 2,
                      "seq_len": 128, "warmup_steps": 1, "log_every": 1, "eval_every": 0,
                      "out_dir": os.path.join(os.path.dirname(path), "nccl_run")}})
        lines = []
        hist = Trainer(cfg, _Patterns(128), state=state, log=lines.append).fit()
        result.update(steps=len(hist), losses=[round(h.loss, 4) for h in hist],
                      log=lines[-2:], finite=all(math.isfinite(h.loss) for h in hist))
        dist.barrier()
        result["ok"] = result["collectives_ok"] and result["finite"]
    finally:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        dist.destroy_process_group()


_SECTION_FNS = {"kernels": section_kernels, "timings": section_timings,
                "training": section_training, "nccl": section_nccl}


# ---- the markdown ------------------------------------------------------------------------

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


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--nccl-worker":
    nccl_worker(sys.argv[2])
