"""Benchmark the Triton kernels against torch eager, torch SDPA and torch.compile, report
peak memory of the fused FFN and linear-cross-entropy, and check every op's errors.

    python runners/bench_kernels.py                            # ChatGLM3-6B sweep, bf16
    python runners/bench_kernels.py --bench.ops attention --bench.seq_lens 1024,4096 \
        --bench.micro_batch_size 2
    python runners/bench_kernels.py --bench.ops ffn,cross_entropy --bench.tokens 4096,8192
    python runners/bench_kernels.py --bench.profile_dir traces/   # + torch.profiler traces
    python runners/bench_kernels.py --bench.check true            # errors vs the references

Timings need a CUDA GPU (triton.testing.do_bench times device kernels). Without one the
script says so and runs the correctness sweep under the Triton interpreter instead (tiny
shapes, fp32 and fp16, well under a minute on 2 cores).

Throughput is "useful work": attention counts only visible (query, key) pairs, the FFN and
the output head count the unfused model's matmuls (so recomputation in a backward shows up
as a lower rate, not as extra credit). % of peak is against bench.peak_tflops / peak_gbs
(H100 SXM dense bf16: 989 TFLOP/s, 3.35 TB/s HBM3).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.config_cli import Alias, command
from engine.errors import run_main

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must happen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import cross_entropy, flash_attention, rms_norm, rotary, swiglu  # noqa: E402
from kernels import reference as ref  # noqa: E402
from model.config import GLMConfig  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("rms_norm", "add_rms_norm", "swiglu", "ffn", "rotary", "attention", "cross_entropy")
DEVICE = "cuda"  # every benchmark tensor lives here
FP32_PEAK_TFLOPS = 67.0  # H100 SXM non-tensor-core fp32: what fp32 ("ieee") dots run on


@dataclass
class BenchModel:
    preset: str = "chatglm3-6b"    # GLMConfig preset giving hidden/heads/groups/head dim/ffn/vocab


@dataclass
class BenchKernels:
    ops: list[str] = field(default_factory=lambda: list(OPS))  # ops to benchmark (ffn =
    #                                fused SwiGLU matmul + down projection)
    check: bool = False            # only the correctness sweep (max abs errors vs
    #                                kernels/reference.py)
    compile: bool = True           # also time torch.compile (false: skip those rows)
    profile_dir: str = ""          # also write a torch.profiler chrome trace per op and shape here
    dtype: str = "bf16"            # bf16 | fp16 | fp32
    tokens: list[int] = field(default_factory=lambda: [2048, 8192])  # token counts (batch *
    #                                seq) for the row-wise ops, FFN and head
    seq_lens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])  # attention
    #                                sequence lengths
    micro_batch_size: int = 1      # attention batch size
    warmup_ms: int = 25            # do_bench warmup (ms)
    rep_ms: int = 100              # do_bench repetition time (ms)
    peak_tflops: float = 989.0     # dense 16-bit tensor-core peak of the GPU
    peak_gbs: float = 3350.0       # memory bandwidth, GB/s

    def __post_init__(self):
        bad = [o for o in self.ops if o not in OPS]
        if bad:
            raise ValueError(f"bench.ops: unknown {bad[0]!r}; known: {', '.join(OPS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"bench.dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")


COMMAND = command(__doc__, {"model": BenchModel, "bench": BenchKernels}, aliases={
    "--ops": Alias("bench.ops", many=True), "--check": Alias("bench.check", switch=True),
    "--no-compile": Alias("bench.compile", switch=True, value=False),
    "--profile": Alias("bench.profile_dir"), "--preset": Alias("model.preset"),
    "--dtype": Alias("bench.dtype"), "--tokens": Alias("bench.tokens", many=True),
    "--seqs": Alias("bench.seq_lens", many=True), "--batch": Alias("bench.micro_batch_size"),
    "--warmup": Alias("bench.warmup_ms"), "--rep": Alias("bench.rep_ms"),
    "--peak-tflops": Alias("bench.peak_tflops"), "--peak-gbs": Alias("bench.peak_gbs")})


# =========================================================================== helpers
class Bench:
    """Times implementations of one op and prints one row each."""

    def __init__(self, args):
        self.args = args
        self.dtype = DTYPES[args.dtype]
        self.peak_tflops = args.peak_tflops if self.dtype != torch.float32 else FP32_PEAK_TFLOPS
        if args.compile:
            import torch._dynamo as dynamo
            dynamo.config.cache_size_limit = 256  # one graph per shape in the sweep
        self.compiled = {}

    def compile(self, fn):
        if not self.args.compile:
            return None
        if fn not in self.compiled:
            self.compiled[fn] = torch.compile(fn, dynamic=False)
        return self.compiled[fn]

    def time_ms(self, fn, grads=None) -> float:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=self.args.warmup_ms, rep=self.args.rep_ms,
                                       grad_to_none=grads, return_mode="median")

    def row(self, op, shape, impl, mode, ms, flops=None, nbytes=None, err=None):
        if flops is not None:
            rate = flops / ms / 1e9
            rate_s = f"{rate:8.1f} TFLOP/s {100 * rate / self.peak_tflops:5.1f}%"
        else:
            rate = nbytes / ms / 1e6
            rate_s = f"{rate:8.0f} GB/s    {100 * rate / self.args.peak_gbs:5.1f}%"
        err_s = "" if err is None else f"  max|out - triton| {err:.1e}"
        print(f"{op:<14} {shape:<28} {impl:<9} {mode:<8} {ms:9.3f} ms {rate_s}{err_s}",
              flush=True)

    def run(self, op, shape, impls: dict, inputs, grad_outs, flops=None, nbytes=None):
        """impls: name -> fn(*inputs) returning a tensor or a tuple of tensors.
        flops / nbytes: dicts {"fwd": ..., "fwd+bwd": ...} of useful work."""
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        baseline = None
        for name, fn in impls.items():
            if fn is None:
                continue
            try:
                with torch.no_grad():
                    out = fn(*inputs)
                first = out[-1] if isinstance(out, tuple) else out
                if baseline is None:
                    baseline, err = first.float(), None
                else:  # spot check against the first implementation (Triton)
                    err = (first.float() - baseline).abs().max().item()
                ms = self.time_ms(lambda: fn(*inputs))
                self.row(op, shape, name, "fwd", ms, _get(flops, "fwd"), _get(nbytes, "fwd"),
                         err)

                def step():
                    outs = fn(*inputs)
                    outs = outs if isinstance(outs, tuple) else (outs,)
                    torch.autograd.backward(outs, grad_outs)
                ms = self.time_ms(step, grads=leaves)
                self.row(op, shape, name, "fwd+bwd", ms, _get(flops, "fwd+bwd"),
                         _get(nbytes, "fwd+bwd"))
            except Exception as e:  # noqa: BLE001 - a baseline that cannot run is a row
                print(f"{op:<14} {shape:<28} {name:<9} failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:100]}", flush=True)
                torch.cuda.empty_cache()  # e.g. the eager baseline ran out of memory
            for t in leaves:
                t.grad = None
        if self.args.profile_dir:
            profile(self.args.profile_dir, op, shape, impls, inputs, grad_outs)


def _get(d, key):
    return None if d is None else d[key]


def profile(out_dir, op, shape, impls, inputs, grad_outs):
    """Five fwd+bwd steps of every implementation under torch.profiler, one trace file."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    os.makedirs(out_dir, exist_ok=True)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for name, fn in impls.items():
            if fn is None:
                continue
            for _ in range(5):
                with torch.profiler.record_function(f"{op}/{name}"):
                    outs = fn(*inputs)
                    outs = outs if isinstance(outs, tuple) else (outs,)
                    torch.autograd.backward(outs, grad_outs)
            torch.cuda.synchronize()
    path = os.path.join(out_dir, f"{op}_{re.sub(r'[^A-Za-z0-9=]+', '_', shape).strip('_')}.json")
    prof.export_chrome_trace(path)
    print(f"  trace -> {path}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8))
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None


def peak_memory(step, leaves) -> tuple[float, float]:
    """(MiB held after the forward: output + what autograd saved, MiB peak over fwd+bwd),
    both above what was allocated before the call."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    out.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    for t in leaves:
        t.grad = None
    return held / 2 ** 20, peak / 2 ** 20


def visible_pairs(sq: int, prefix: int) -> int:
    """(query, key) pairs the mask lets through for one head: row i sees max(prefix, i+1)."""
    p = min(prefix, sq)
    return p * p + sum(max(p, i + 1) for i in range(p, sq))


# ======================================================================= benchmarks
def bench_rows(bench: Bench, cfg: GLMConfig, ops):
    dt, h, dev = bench.dtype, cfg.hidden_size, DEVICE
    e = torch.tensor([], dtype=dt).element_size()
    f = cfg.ffn_hidden_size
    for n in bench.args.tokens:
        x = torch.randn(n, h, device=dev, dtype=dt, requires_grad=True)
        w = torch.ones(h, device=dev, dtype=dt, requires_grad=True)
        if "rms_norm" in ops:
            bench.run("rms_norm", f"[{n}, {h}]",
                      {"triton": lambda a, b: rms_norm.rms_norm(a, b, 1e-5),
                       "eager": lambda a, b: ref.rms_norm(a, b, 1e-5),
                       "compile": _c(bench, ref.rms_norm, 1e-5)},
                      (x, w), (torch.randn_like(x),),
                      nbytes={"fwd": 2 * n * h * e, "fwd+bwd": 5 * n * h * e})
        if "add_rms_norm" in ops:
            r = torch.randn_like(x, requires_grad=True)
            bench.run("add_rms_norm", f"[{n}, {h}]",
                      {"triton": lambda a, b, c: rms_norm.add_rms_norm(a, b, c, 1e-5),
                       "eager": lambda a, b, c: ref.add_rms_norm(a, b, c, 1e-5),
                       "compile": _c(bench, ref.add_rms_norm, 1e-5)},
                      (x, r, w), (torch.randn_like(x), torch.randn_like(x)),
                      nbytes={"fwd": 4 * n * h * e, "fwd+bwd": 8 * n * h * e})
        if "swiglu" in ops:
            gu = torch.randn(n, 2 * f, device=dev, dtype=dt, requires_grad=True)
            bench.run("swiglu", f"[{n}, {2 * f}]",
                      {"triton": swiglu.swiglu, "eager": ref.swiglu,
                       "compile": bench.compile(ref.swiglu)},
                      (gu,), (torch.randn(n, f, device=dev, dtype=dt),),
                      nbytes={"fwd": 3 * n * f * e, "fwd+bwd": 8 * n * f * e})
        if "rotary" in ops:
            nh, d = cfg.num_attention_heads, cfg.kv_channels
            q = torch.randn(n, 1, nh, d, device=dev, dtype=dt, requires_grad=True)
            pos = torch.arange(n, device=dev).view(1, n)
            cos, sin = (t.transpose(0, 1).unsqueeze(2)
                        for t in ref.rotary_angles(pos, pos // 7, d, 10000.0))
            bench.run("rotary", f"[{n}, 1, {nh}, {d}]",
                      {"triton": rotary.apply_rotary, "eager": ref.apply_rotary,
                       "compile": bench.compile(ref.apply_rotary)},
                      (q, cos, sin), (torch.randn_like(q),),
                      nbytes={"fwd": 2 * q.numel() * e + n * d * 4,
                              "fwd+bwd": 4 * q.numel() * e + 2 * n * d * 4})


def _c(bench, fn, eps):
    """torch.compile of a reference that takes eps last."""
    compiled = bench.compile(fn)
    return None if compiled is None else (lambda *a: compiled(*a, eps))


def bench_ffn(bench: Bench, cfg: GLMConfig):
    dt, h, f, dev = bench.dtype, cfg.hidden_size, cfg.ffn_hidden_size, DEVICE
    w1 = (torch.randn(2 * f, h, device=dev, dtype=dt) * h ** -0.5).requires_grad_()
    w2 = (torch.randn(h, f, device=dev, dtype=dt) * f ** -0.5).requires_grad_()

    def fused(x, a, b):
        return F.linear(swiglu.swiglu_linear(x, a), b)

    def unfused(x, a, b):
        return F.linear(ref.swiglu(F.linear(x, a)), b)

    for n in bench.args.tokens:
        x = torch.randn(n, h, device=dev, dtype=dt, requires_grad=True)
        flops = 2 * n * h * 3 * f  # up [h -> 2f] + down [f -> h]
        bench.run("ffn", f"[{n}, {h}] f={f}",
                  {"triton": fused, "eager": unfused, "compile": bench.compile(unfused)},
                  (x, w1, w2), (torch.randn(n, h, device=dev, dtype=dt),),
                  flops={"fwd": flops, "fwd+bwd": 3 * flops})
        g = torch.randn(n, h, device=dev, dtype=dt)
        for name, fn in (("triton", fused), ("eager", unfused)):
            held, peak = peak_memory(lambda fn=fn: (fn(x, w1, w2) * g).sum(), (x, w1, w2))
            print(f"{'ffn memory':<14} {f'[{n}, {h}] f={f}':<28} {name:<9} saved after fwd "
                  f"{held:8.1f} MiB   peak fwd+bwd {peak:8.1f} MiB", flush=True)


def bench_attention(bench: Bench, cfg: GLMConfig):
    dt, dev, b = bench.dtype, DEVICE, bench.args.micro_batch_size
    nh, ng, d = cfg.num_attention_heads, cfg.multi_query_group_num, cfg.kv_channels

    def sdpa_causal(q, k, v, pre):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def sdpa_mask(q, k, v, pre):
        mask = ref.attention_mask(q.shape[2], k.shape[2], pre, None, 0, q.shape[0], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def tri(q, k, v, pre):
        return flash_attention.attention(q, k, v, pre)

    def eager(q, k, v, pre):
        return ref.attention(q, k, v, pre)

    for s in bench.args.seq_lens:
        q = torch.randn(b, nh, s, d, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(b, ng, s, d, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(b, ng, s, d, device=dev, dtype=dt, requires_grad=True)
        for kind, prefix in (("causal", 0), ("prefix", s // 2)):
            pre = torch.full((b,), prefix, device=dev, dtype=torch.long)
            fwd = 4 * d * visible_pairs(s, prefix) * b * nh
            bench.run("attention", f"{kind} b{b} s{s} h{nh}/{ng} d{d}",
                      {"triton": tri, "eager": eager,
                       "sdpa": sdpa_causal if prefix == 0 else sdpa_mask,
                       "compile": bench.compile(eager)},
                      (q, k, v, pre), (torch.randn_like(q),),
                      flops={"fwd": fwd, "fwd+bwd": 3.5 * fwd})  # bwd = 2.5 x fwd (FA2)


def bench_cross_entropy(bench: Bench, cfg: GLMConfig):
    dt, h, vocab, dev = bench.dtype, cfg.hidden_size, cfg.padded_vocab_size, DEVICE
    w = (torch.randn(vocab, h, device=dev, dtype=dt) * h ** -0.5).requires_grad_()
    for n in bench.args.tokens:
        x = torch.randn(n, h, device=dev, dtype=dt, requires_grad=True)
        labels = torch.randint(0, vocab, (n,), device=dev)
        labels[::10] = -100
        flops = 2 * n * h * vocab
        bench.run("cross_entropy", f"[{n}, {h}] V={vocab}",
                  {"triton": lambda a, b, c: cross_entropy.linear_cross_entropy(a, b, c),
                   "eager": ref.linear_cross_entropy,
                   "compile": bench.compile(ref.linear_cross_entropy)},
                  (x, w, labels), (torch.rand(n, device=dev),),
                  flops={"fwd": flops, "fwd+bwd": 3 * flops})
        for name, fn in (("triton", cross_entropy.linear_cross_entropy),
                         ("eager", ref.linear_cross_entropy)):
            held, peak = peak_memory(lambda fn=fn: fn(x, w, labels).mean(), (x, w))
            print(f"{'ce memory':<14} {f'[{n}, {h}] V={vocab}':<28} {name:<9} saved after fwd "
                  f"{held:8.1f} MiB   peak fwd+bwd {peak:8.1f} MiB", flush=True)


# ================================================================ correctness sweep
def _max_errs(fn, fn_ref, inputs, grad_outs):
    """[forward error, error of each input gradient] between fn and fn_ref."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    outs = []
    for f in (fn, fn_ref):
        o = f(*inputs)
        o = o if isinstance(o, tuple) else (o,)
        grads = torch.autograd.grad(o, leaves, grad_outs)
        outs.append((o, grads))
    (o, g), (o_r, g_r) = outs
    pairs = list(zip(o, o_r)) + list(zip(g, g_r))
    errs = [(a.float() - b.float()).abs().max().item() for a, b in pairs]
    # one forward figure: the worst over the outputs (add_rms_norm returns two)
    errs = [max(errs[:len(o)])] + errs[len(o):]
    scale = max(b.float().abs().max().item() for _, b in pairs)
    return errs, max(errs) / max(scale, 1e-30)


def check_sweep(device: str, big: bool):
    """Max abs errors of every op against kernels/reference.py, fp32 and fp16 (+ bf16 on a
    GPU). Small odd shapes under the interpreter; model-sized ones on a GPU."""
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    s, b, nh, ng, d, h, f, vocab = ((1024, 2, 32, 2, 128, 4096, 13696, 65024) if big else
                                    (37, 2, 4, 2, 16, 48, 50, 300))
    torch.manual_seed(0)
    print(f"{'op':<16} {'dtype':<9} {'shape':<26} max abs error: forward | input grads")
    for dt in dtypes:
        def leaf(*shape, scale=1.0):
            return (torch.randn(*shape, device=device) * scale).to(dt).requires_grad_()

        pos = torch.randint(0, s, (b, s), device=device)
        cos, sin = (t.transpose(0, 1).unsqueeze(2)
                    for t in ref.rotary_angles(pos, pos % 5, d, 10000.0))
        x, r, w = leaf(s, b, h), leaf(s, b, h), leaf(h, scale=0.1)
        with torch.no_grad():
            w += 1
        pre = torch.tensor([0, s // 2] + [s] * (b - 2), device=device)[:b]
        pad = torch.tensor([s // 8] + [0] * (b - 1), device=device)  # left padding
        labels = torch.randint(0, vocab, (s * b,), device=device)
        labels[::7] = -100
        cases = [
            ("rms_norm", f"{list(x.shape)}", lambda a, c: rms_norm.rms_norm(a, c, 1e-5),
             lambda a, c: ref.rms_norm(a, c, 1e-5), (x, w)),
            ("add_rms_norm", f"{list(x.shape)}",
             lambda a, q, c: rms_norm.add_rms_norm(a, q, c, 1e-5),
             lambda a, q, c: ref.add_rms_norm(a, q, c, 1e-5), (x, r, w)),
            ("swiglu", f"[{s * b}, {2 * f}]", swiglu.swiglu, ref.swiglu, (leaf(s * b, 2 * f),)),
            ("swiglu_linear", f"[{s * b}, {h}] x [{2 * f}, {h}]", swiglu.swiglu_linear,
             ref.swiglu_linear, (leaf(s * b, h), leaf(2 * f, h, scale=h ** -0.5))),
            ("rotary", f"[{s}, {b}, {nh}, {d}] 2D", rotary.apply_rotary, ref.apply_rotary,
             (leaf(s, b, nh, d), cos, sin)),
            ("attention", f"b{b} s{s} h{nh}/{ng} d{d} pre",
             lambda q, k, v: flash_attention.attention(q, k, v, pre),
             lambda q, k, v: ref.attention(q, k, v, pre),
             (leaf(b, nh, s, d), leaf(b, ng, s, d), leaf(b, ng, s, d))),
            ("attn mqa+pad", f"b{b} s{s} h{nh}/1 d{d} pad",
             lambda q, k, v: flash_attention.attention(q, k, v, pre // 2, pad),
             lambda q, k, v: ref.attention(q, k, v, pre // 2, pad),
             (leaf(b, nh, s, d), leaf(b, 1, s, d), leaf(b, 1, s, d))),
            ("attn decode", f"b{b} 1/{s} h{nh}/{ng} d{d}",
             lambda q, k, v: flash_attention.attention(q, k, v, pre, pre // 4, s - 1),
             lambda q, k, v: ref.attention(q, k, v, pre, pre // 4, s - 1),
             (leaf(b, nh, 1, d), leaf(b, ng, s, d), leaf(b, ng, s, d))),
            ("linear_ce", f"[{s * b}, {h}] V={vocab}",
             lambda a, c: cross_entropy.linear_cross_entropy(a, c, labels),
             lambda a, c: ref.linear_cross_entropy(a, c, labels),
             (leaf(s * b, h), leaf(vocab, h, scale=h ** -0.5))),
        ]
        for name, shape, fn, fn_ref, inputs in cases:
            t0 = time.perf_counter()
            with torch.no_grad():
                probe = fn(*inputs)
            outs = probe if isinstance(probe, tuple) else (probe,)
            grad_outs = tuple(torch.randn_like(o) for o in outs)
            errs, rel = _max_errs(fn, fn_ref, inputs, grad_outs)
            dt_name = str(dt).replace("torch.", "")
            print(f"{name:<16} {dt_name:<9} {shape:<26} {errs[0]:.2e} | "
                  + " ".join(f"{e:.2e}" for e in errs[1:])
                  + f"   (worst / max|ref| {rel:.1e}, {time.perf_counter() - t0:.1f}s)",
                  flush=True)


# ============================================================================= main
def run(config):
    args = config.bench
    if not HAS_CUDA:
        print("No CUDA device: kernel timings need a GPU (triton.testing.do_bench times "
              "device kernels), so none are reported here.\nRunning the correctness sweep "
              "under the Triton interpreter instead (TRITON_INTERPRET=1).\n", flush=True)
        check_sweep("cpu", big=False)
        return
    if args.check:
        check_sweep("cuda", big=True)
        return
    cfg = GLMConfig.preset(config.model.preset)
    bench = Bench(args)
    name = torch.cuda.get_device_name()
    print(f"{name}: {config.model.preset} hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}"
          f"/{cfg.multi_query_group_num} x {cfg.kv_channels}, ffn {cfg.ffn_hidden_size}, "
          f"vocab {cfg.padded_vocab_size}, {args.dtype}; peak {bench.peak_tflops:.0f} "
          f"TFLOP/s, {args.peak_gbs:.0f} GB/s")
    print(f"{'op':<14} {'shape':<28} {'impl':<9} {'pass':<8} {'time':>12} {'rate':>15} "
          f"{'of peak':>7}")
    ops = set(args.ops)
    if ops & {"rms_norm", "add_rms_norm", "swiglu", "rotary"}:
        bench_rows(bench, cfg, ops)
    if "ffn" in ops:
        bench_ffn(bench, cfg)
    if "attention" in ops:
        bench_attention(bench, cfg)
    if "cross_entropy" in ops:
        bench_cross_entropy(bench, cfg)



def main(argv=None):
    return COMMAND.main(run, argv)


if __name__ == "__main__":
    run_main(main)
