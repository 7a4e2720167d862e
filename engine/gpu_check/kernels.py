"""GPU check (1): every Triton kernel against the torch reference on CUDA, fp16 and bf16.
Forward and input-gradient errors relative to an fp32 reference; a kernel passes when it
is no worse than twice the reference's own error in the same dtype (or under a floor)."""
from __future__ import annotations

import json
import math

import torch

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
