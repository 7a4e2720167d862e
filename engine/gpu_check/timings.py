"""GPU check (2): each kernel timed against torch eager, SDPA (attention) and
torch.compile with triton.testing.do_bench: ms, TFLOP/s or GB/s, % of the device's peak,
and the memory of one fwd+bwd."""
from __future__ import annotations

import json
import time

import torch

from engine.gpu_check.common import step_peak_mib

def _bench_ms(fn, grads=None) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grads,
                                         return_mode="median"))


def _timing_cases(plan, device):
    import torch.nn.functional as F
    from kernels import cross_entropy, flash_attention, reference as ref, rms_norm, rotary, swiglu
    sh, n, dt = plan.shapes, plan.timing_tokens, torch.bfloat16
    h, f, vocab = sh["hidden"], sh["ffn"], sh["vocab"]
    nh, ng, d, s = sh["heads"], sh["groups"], sh["head_dim"], plan.timing_seq_len
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
                    row.update(ms=round(ms, 4), peak_mib=step_peak_mib(step, device))
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
