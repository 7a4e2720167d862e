"""Device profiles: how fast one device computes and moves bytes, from a named profile
(`--device h100`) or measured on this machine (`calibrate()`).

GEMM efficiency shrinks with small matrices: a matmul whose smallest dimension is n runs
at about  flops * efficiency * n / (n + n_half).  For the GPU profiles n_half is a
typical cuBLAS figure; `calibrate` fits it from matmuls of several sizes.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    flops: float              # dense matmul FLOP/s in the training dtype (peak or measured)
    memory_bytes: float       # per device
    intra_bw: float           # bytes/s per direction between devices of one node
    inter_bw: float           # bytes/s per direction between nodes
    mem_bw: float             # device memory bytes/s (elementwise work, optimizer step)
    efficiency: float = 1.0   # fraction of `flops` a large GEMM reaches
    n_half: float = 0.0       # GEMM dimension at which efficiency halves
    op_overhead: float = 0.0  # seconds of framework dispatch per operator (fwd or bwd)
    async_launch: bool = True     # GPU: dispatch overlaps execution; CPU: it adds up
    p2p_bw: float | None = None   # measured stage-to-stage bandwidth; None: the link's
    reserved_bytes: float = 0.0   # runtime, communicator buffers, allocator slack
    precision: str = "bf16"   # what training on this device uses (PlanRequest default)
    kernels: str = "fused"
    measured: bool = False

    def __post_init__(self):
        for name in ("flops", "memory_bytes", "intra_bw", "inter_bw", "mem_bw"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency={self.efficiency} must be in (0, 1]")
        for name in ("n_half", "op_overhead", "reserved_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")

    def gemm_rate(self, *dims: float) -> float:
        """Achieved FLOP/s of a matmul whose dimensions include `dims`."""
        rate = self.flops * self.efficiency
        for n in dims:
            rate *= n / (n + self.n_half)
        return rate


GB = 1e9
PROFILES = {
    # H100 SXM: 989 TFLOP/s dense bf16, NVLink 4 ~450 GB/s per direction, 400 Gb/s IB,
    # 3.35 TB/s HBM3; cuBLAS reaches ~70% of peak on large bf16 GEMMs; eager PyTorch
    # spends ~10 us of host time per operator, hidden behind the GPU unless ops are tiny
    "h100": DeviceProfile("h100", 989e12, 80 * GB, 450 * GB, 50 * GB, 3.35e12,
                          efficiency=0.7, n_half=128, op_overhead=10e-6,
                          reserved_bytes=3 * GB),
    # A100 SXM 80 GB: 312 TFLOP/s bf16, NVLink 3 300 GB/s per direction, 200 Gb/s IB
    "a100": DeviceProfile("a100", 312e12, 80 * GB, 300 * GB, 25 * GB, 2.0e12,
                          efficiency=0.8, n_half=96, op_overhead=10e-6,
                          reserved_bytes=3 * GB),
}


def device_profile(name: str, **overrides) -> DeviceProfile:
    """A named profile ("h100", "a100"), or "cpu" measured now by calibrate()."""
    key = name.lower()
    if key == "cpu":
        return replace(calibrate(torch.device("cpu")), **overrides)
    if key not in PROFILES:
        raise ValueError(f"unknown device {name!r}; known: {', '.join(sorted(PROFILES))}, cpu")
    return replace(PROFILES[key], **overrides)


# ---- measurement -----------------------------------------------------------------------

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_linear(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...],
                   width: int, repeats: int = 3) -> dict[int, float]:
    """Training FLOP/s of a linear layer, [m, width] x [width, width] forward plus both
    backward matmuls (autograd, so the transposed layouts are the ones training runs),
    6 m width^2 FLOPs, for each m in `sizes` (best of `repeats`)."""
    out = {}
    w = torch.randn(width, width, device=device, dtype=dtype, requires_grad=True)
    for m in sizes:
        x = torch.randn(m, width, device=device, dtype=dtype, requires_grad=True)
        g = torch.ones(m, width, device=device, dtype=dtype)
        reps = max(1, int(3e8 // (6 * m * width * width)))  # ~0.3 GFLOP per timing on CPU

        def run(x=x, g=g, reps=reps):
            for _ in range(reps):
                torch.nn.functional.linear(x, w).backward(g)
        out[m] = 6.0 * m * width * width * reps / _best_time(run, device, repeats)
    return out


def measure_op_overhead(device: torch.device, n: int = 200, repeats: int = 3) -> float:
    """Seconds per operator of a chain of tiny autograd ops (forward + backward): the
    framework's dispatch cost, which dominates ops on small tensors."""
    x = torch.ones(8, device=device, requires_grad=True)

    def run():
        y = x
        for _ in range(n):
            y = y * 1.0001
        y.sum().backward()
    return _best_time(run, device, repeats) / (2 * n)


def fit_n_half(rates: dict[int, float]) -> tuple[float, float]:
    """(peak, n_half) of rate(n) = peak * n / (n + n_half), from measured rates: the peak
    is the best rate, n_half the median of n * (peak / rate - 1) over the smaller sizes."""
    peak = max(rates.values())
    halves = [n * (peak / r - 1.0) for n, r in rates.items() if r < peak]
    return peak, (statistics.median(halves) if halves else 0.0)


def measure_copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 3) -> float:
    """Bytes/s of a device-memory copy (read + write counted)."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return 2.0 * nbytes / _best_time(lambda: dst.copy_(src), device, repeats)


def measure_collectives(group=None, nbytes: int = 8 << 20, repeats: int = 3) -> dict:
    """Collective over `group` (every member must call it): all-reduce bus bandwidth,
    2 (n - 1) / n * bytes / time (comparable to a link's per-direction bandwidth), and
    ring P2P bandwidth (each rank sends `nbytes` to the next and receives from the
    previous at once). Needs an initialised process group."""
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend(group) == "nccl" else torch.device("cpu"))
    buf = torch.ones(nbytes // 4, device=device)

    def all_reduce():
        dist.all_reduce(buf, group=group)

    out = {"world": n, "allreduce_bw": float("inf"), "p2p_bw": float("inf")}
    if n == 1:
        return out
    t = _best_time(all_reduce, device, repeats)
    out["allreduce_bw"] = 2.0 * (n - 1) / n * nbytes / t
    recv = torch.empty_like(buf)
    nxt = dist.get_global_rank(group, (rank + 1) % n) if group is not None else (rank + 1) % n
    prv = dist.get_global_rank(group, (rank - 1) % n) if group is not None else (rank - 1) % n

    def ring():
        ops = [dist.P2POp(dist.isend, buf, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    out["p2p_bw"] = nbytes / _best_time(ring, device, repeats)
    # every rank reports the slowest rank's figures
    vals = torch.tensor([out["allreduce_bw"], out["p2p_bw"]], dtype=torch.float64)
    dist.all_reduce(vals, op=dist.ReduceOp.MIN, group=group)
    out["allreduce_bw"], out["p2p_bw"] = vals.tolist()
    return out


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GB


def calibrate(device: torch.device | str | None = None, group=None, repeats: int = 5,
              sizes: tuple[int, ...] | None = None) -> DeviceProfile:
    """Measure this device: linear-layer training throughput (torch matmuls, fp32 on CPU,
    bf16 on CUDA) at several sizes, memory copy bandwidth, per-operator dispatch cost,
    and -- when a process group is up (every rank must then
    call this) -- all-reduce and P2P bandwidth. Without a process group the link figures
    are the memory copy bandwidth (one process: nothing crosses a link)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    width = 4096 if cuda else 512
    sizes = sizes or ((64, 256, 1024, 4096, 16384) if cuda else (16, 64, 256, 1024))
    peak, n_half = fit_n_half(measure_linear(device, dtype, sizes, width, repeats))
    mem_bw = measure_copy_bandwidth(device, (256 << 20) if cuda else (32 << 20), repeats)
    op_overhead = measure_op_overhead(device, repeats=repeats)
    intra = inter = mem_bw
    p2p = None
    if dist.is_available() and dist.is_initialized():
        c = measure_collectives(group, repeats=repeats)
        if c["world"] > 1:
            intra = inter = c["allreduce_bw"]
            p2p = c["p2p_bw"]
    memory = (torch.cuda.get_device_properties(device).total_memory if cuda
              else _physical_memory())
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return DeviceProfile(name=f"{name} (measured)", flops=peak, memory_bytes=memory,
                         intra_bw=intra, inter_bw=inter, mem_bw=mem_bw, efficiency=1.0,
                         n_half=n_half, op_overhead=op_overhead, async_launch=cuda,
                         p2p_bw=p2p, reserved_bytes=0.0,
                         precision="bf16" if cuda else "fp32",
                         kernels="fused" if cuda else "torch", measured=True)
