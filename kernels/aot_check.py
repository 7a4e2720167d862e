"""Ahead-of-time resource check of every Triton kernel, for GPUs this machine does not have.

Each variant runs the real launcher (kernels/*.py) on meta tensors with the kernels swapped
for recorders, under `ops.planning_for(arch, sms)`: what gets compiled is exactly the
tile, warps, stages and argument specialisation the launcher would pick on that GPU for
those shapes. Each distinct launch is then compiled for the target (triton.compile, no
device needed) and read out:
    shared   bytes of shared memory per program, against the device's opt-in maximum
    regs     registers per thread, spill stores + loads in bytes (ptxas -v on the PTX,
             the ptxas bundled with triton, same flags triton uses)
    tc       for kernels with fp16 / bf16 tl.dot: mma.sync (sm_80) or wgmma / mma.sync
             (sm_90) in the PTX; fma only means the dots missed the tensor cores
A launch fails the check if it spills, exceeds shared memory, or (16-bit dots) misses the
tensor cores. Must run WITHOUT TRITON_INTERPRET (the kernels must be JIT functions).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import torch

# device limits: opt-in shared memory per block (bytes) and SM count
TARGETS = {80: ("sm_80", 166_912, 108), 90: ("sm_90", 232_448, 132)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# the model shapes: (hidden, heads, groups, head_dim, ffn, vocab); head_dim 64 is the same
# width at twice the heads (the other common GLM / Llama head size)
MODELS = {
    "chatglm3-6b": (4096, 32, 2, 128, 13696, 65024),
    "glm4-9b": (4096, 32, 2, 128, 13696, 151552),
    "d64": (4096, 64, 4, 64, 13696, 65024),
}
TOKENS = 4096  # tokens per microbatch (b=1, s=4096): only specialisation depends on it
OPS = ("rms_norm", "rotary", "swiglu", "cross_entropy", "attention")
DOT_KERNELS = {"_swiglu_matmul", "_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}


@dataclass
class Launch:
    kernel: object            # the triton JITFunction
    args: tuple
    kwargs: dict
    uses: list = field(default_factory=list)  # variant names that produce this launch

    @property
    def name(self) -> str:
        return self.kernel.__name__


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kw)` records the launch."""

    def __init__(self, fn, sink: list):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.fn, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(sink: list):
    import triton

    from kernels import cross_entropy, flash_attention, rms_norm, rotary, swiglu
    swapped = []
    for mod in (rms_norm, rotary, swiglu, cross_entropy, flash_attention):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.startswith("_"):
                swapped.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, sink))
    if not swapped:
        raise RuntimeError("no Triton JIT kernels found: unset TRITON_INTERPRET for the "
                           "ahead-of-time check")
    try:
        yield
    finally:
        for mod, name, obj in swapped:
            setattr(mod, name, obj)


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


# ----------------------------------------------------------------------- the variants
def _variants(models, dtypes):
    """(variant name, op, callable running the launcher on meta tensors) per model shape."""
    from kernels import cross_entropy as ce
    from kernels import flash_attention as fa
    from kernels import rms_norm as rn
    from kernels import rotary as ro
    from kernels import swiglu as sw
    out = []
    n = TOKENS
    for model in models:
        hidden, heads, groups, d, ffn, vocab = MODELS[model]
        for dn in dtypes:
            dt = DTYPES[dn]
            tag = f"{model} {dn}"

            def norm(dt=dt, hidden=hidden):
                x, w = _meta(n, hidden, dtype=dt), _meta(hidden, dtype=dt)
                s2, _, rstd = rn._forward(x, x, w, 1e-5)
                rn._forward(x, None, w, 1e-5)
                rn._backward(x, x, s2, w, rstd)
                rn._backward(x, None, s2, w, rstd)
            out.append((f"rms_norm h{hidden} {tag}", "rms_norm", norm))

            def rotary(dt=dt, heads=heads, d=d):
                x = _meta(n, 1, heads, d, dtype=dt)
                cs = _meta(n, 1, 1, d // 2, dtype=torch.float32)
                ro._launch(x, cs, cs, negate_sin=False)
                ro._launch(x, cs, cs, negate_sin=True)
            out.append((f"rotary d{d} {tag}", "rotary", rotary))

            for tp in (1, 2, 4):
                f = ffn // tp

                def ffn_(dt=dt, f=f, hidden=hidden):
                    x, w = _meta(n, hidden, dtype=dt), _meta(2 * f, hidden, dtype=dt)
                    sw.swiglu_linear_forward(x, w)
                    dy = _meta(n, f, dtype=dt)
                    sw.swiglu_linear_backward(x, w, dy, True, True,
                                              sw.default_chunk_rows(n, hidden, 2 * f))
                    gu = _meta(n, 2 * f, dtype=dt)
                    sw.swiglu_forward(gu)
                    sw.swiglu_backward(gu, dy)
                out.append((f"swiglu ffn{f} (tp={tp}) {tag}", "swiglu", ffn_))

            def xent(dt=dt, hidden=hidden, vocab=vocab):
                h, w = _meta(n, hidden, dtype=dt), _meta(vocab, hidden, dtype=dt)
                labels = _meta(n, dtype=torch.long)
                chunk = ce.default_chunk_rows(n, hidden, vocab)
                _, lse = ce.ce_forward(h, w, labels, -100, chunk)
                ce.ce_backward(_meta(n, dtype=torch.float32), h, w, labels, lse, -100, chunk,
                               True, True)
            out.append((f"cross_entropy V{vocab} {tag}", "cross_entropy", xent))

            for sq, what in ((n, "train"), (1, "decode")):
                def attn(dt=dt, heads=heads, groups=groups, d=d, sq=sq):
                    q = _meta(1, heads, sq, d, dtype=dt)
                    k = _meta(1, groups, n, d, dtype=dt)
                    zeros = _meta(1, dtype=torch.int32)
                    # mask lengths (doc start, prefix, doc end) of one example per row
                    mask = _meta(3, 1, 1, dtype=torch.int32)
                    opts = fa.Options()
                    o, lse = fa.attention_forward(q, k, k, mask, zeros, n - sq, opts)
                    if sq > 1:
                        fa.attention_backward(o, q, k, k, o, lse, mask, zeros, 0, opts)
                out.append((f"attention {what} d{d} {tag}", "attention", attn))

            def packed(dt=dt, heads=heads, groups=groups, d=d):
                # packed rows (several documents per row): per-position mask data [3, 1, n]
                # selects the PACKED=True path, a separate specialisation of each kernel
                q = _meta(1, heads, n, d, dtype=dt)
                k = _meta(1, groups, n, d, dtype=dt)
                zeros = _meta(1, dtype=torch.int32)
                mask = _meta(3, 1, n, dtype=torch.int32)
                opts = fa.Options()
                o, lse = fa.attention_forward(q, k, k, mask, zeros, 0, opts)
                fa.attention_backward(o, q, k, k, o, lse, mask, zeros, 0, opts)
            out.append((f"attention packed d{d} {tag}", "attention", packed))
    return out


def plan(arch: int, models, dtypes, ops=None, kernels=None) -> list[Launch]:
    """Every distinct launch the launchers make for these shapes on `arch` (only those of
    `ops` / of the kernels named in `kernels`, when given)."""
    from kernels import ops as kops
    _, _, sms = TARGETS[arch]
    launches: dict = {}
    for name, op, run in _variants(models, dtypes):
        if ops and op not in ops:
            continue
        sink: list = []
        with _recording(sink), kops.planning_for(arch, sms):
            run()
        for ln in sink:
            if kernels and ln.name not in kernels:
                continue
            key = (ln.name, _spec_key(ln, arch))
            launches.setdefault(key, ln).uses.append(name)
    return list(launches.values())


# -------------------------------------------------------------------------- compiling
def _bind(ln: Launch, arch: int):
    """(signature, constexprs, attrs, options) exactly as the JIT launch would derive them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    fn = ln.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*ln.args, **ln.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, ln.kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options


def _spec_key(ln: Launch, arch: int):
    signature, constexprs, attrs, options = _bind(ln, arch)
    return repr((sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                 options.num_warps, options.num_stages))


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_stats(log: str) -> dict:
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m is None:
            raise RuntimeError(f"ptxas -v output lacks {key!r}:\n{log[-2000:]}")
        out[key] = int(m.group(1))
    return out


def _run_ptxas(ptx: str, arch: int) -> str:
    """ptxas -v on the PTX (when the compile came from triton's cache, it printed nothing)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


@dataclass
class Result:
    kernel: str
    arch: int
    config: str
    dtype: str
    shared: int
    regs: int
    spill: int
    tensor_cores: str     # "mma.sync" / "wgmma" / "fma" / "-" (no 16-bit dot)
    seconds: float
    uses: list
    error: str = ""

    @property
    def problems(self) -> list[str]:
        if self.error:
            return [self.error]
        limit = TARGETS[self.arch][1]
        out = []
        if self.spill:
            out.append(f"spills {self.spill} B")
        if self.shared > limit:
            out.append(f"shared {self.shared} B > {limit} B")
        if self.tensor_cores == "fma":
            out.append("16-bit dots miss the tensor cores")
        return out


def _dot_dtype(ln: Launch) -> str:
    for a in ln.args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float32:
            return {torch.float16: "fp16", torch.bfloat16: "bf16"}[a.dtype]
    return "fp32"


def compile_launch(ln: Launch, arch: int) -> Result:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, constexprs, attrs, options = _bind(ln, arch)
    cfg = " ".join([f"{k}={v}" for k, v in ln.kwargs.items() if k.startswith("BLOCK_")
                    or k in ("num_warps", "num_stages")]
                   + [k for k, v in ln.kwargs.items() if v is True])  # HAS_RESIDUAL, ...
    dt = _dot_dtype(ln)
    t0 = time.time()
    log = io.StringIO()
    try:
        with knobs.nvidia.scope():
            knobs.nvidia.dump_ptxas_log = True
            with contextlib.redirect_stdout(log):
                k = triton.compile(ASTSource(ln.kernel, signature, constexprs, attrs),
                                   target=GPUTarget("cuda", arch, 32),
                                   options=options.__dict__)
    except Exception as e:  # an uncompilable pick is a failed check, not a crash
        msg = str(e).strip().splitlines()
        return Result(ln.name, arch, cfg, dt, 0, 0, 0, "-", time.time() - t0, ln.uses,
                      error=f"compile failed: {msg[0] if msg else type(e).__name__}")
    text = log.getvalue()
    if "Used " not in text:
        text = _run_ptxas(k.asm["ptx"], arch)
    stats = _ptxas_stats(text)
    ptx = k.asm["ptx"]
    if ln.name in DOT_KERNELS and dt != "fp32":
        tc = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma")
    else:
        tc = "-"
    return Result(ln.name, arch, cfg, dt, int(k.metadata.shared), stats["regs"],
                  stats["spill_st"] + stats["spill_ld"], tc, time.time() - t0, ln.uses)


def run_check(archs, models, dtypes, ops=None, kernels=None, log=print) -> list[Result]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the ahead-of-time check compiles real kernels: unset "
                           "TRITON_INTERPRET")
    results = []
    for arch in archs:
        launches = plan(arch, models, dtypes, ops, kernels)
        log(f"# {TARGETS[arch][0]}: {len(launches)} distinct launches")
        for ln in launches:
            r = compile_launch(ln, arch)
            results.append(r)
            log(f"  {r.kernel} {r.dtype} {r.config}: {r.seconds:.1f} s"
                + (f"  FAIL {'; '.join(r.problems)}" if r.problems else ""))
    return results


def table(results: list[Result]) -> str:
    """Markdown: one row per (kernel, config, dtype) x target."""
    head = ("| kernel | target | dtype | config | shared B (limit) | regs | spill B | "
            "tensor cores | ok | variants |")
    rows = [head, "|" + "---|" * 10]
    for r in sorted(results, key=lambda r: (r.kernel, r.arch, r.dtype, r.config)):
        name, limit, _ = TARGETS[r.arch]
        uses = sorted({u.split(" ")[0] + " " + " ".join(u.split(" ")[1:-2]) for u in r.uses})
        ok = "FAIL: " + "; ".join(r.problems) if r.problems else "ok"
        rows.append(f"| {r.kernel} | {name} | {r.dtype} | {r.config} | {r.shared:,} "
                    f"({limit:,}) | {r.regs} | {r.spill} | {r.tensor_cores} | {ok} | "
                    f"{len(r.uses)}: {', '.join(uses)[:80]} |")
    return "\n".join(rows)
