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
    latency: float = 0.0      # seconds per collective call or P2P exchange on top of
    #                           bytes / bandwidth (named profiles: bandwidth only)
    host_cores: float = 0.0   # ranks that compute at once at these rates (a host's cores,
    #                           or its share of them); 0: every rank has its own device
    straggler: float = 0.0    # ranks that synchronise wait for the slowest: compute
    #                           takes (1 + straggler) as long (time-sliced hosts; ~0 on
    #                           dedicated devices, see measure_sync)
    native_reduce_scatter: bool = True  # False on gloo: reduce-scatter is an all-reduce
    #                           and a slice (engine/tensor_parallel/mappings.py)
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
        for name in ("n_half", "op_overhead", "reserved_bytes", "latency", "straggler",
                     "host_cores"):
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
    # H200 SXM: the H100's compute (989 TFLOP/s dense bf16) with 141 GB of 4.8 TB/s HBM3e
    "h200": DeviceProfile("h200", 989e12, 141 * GB, 450 * GB, 50 * GB, 4.8e12,
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


STATS = ("best", "median")


def _comm_device(group) -> torch.device:
    """Where a collective's tensors must live: NCCL takes CUDA tensors only."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _best_time(fn, device, repeats: int, stat: str = "best") -> float:
    """Seconds per call after a warm-up: the best of `repeats` (the device's capability),
    or their median (what a step sees on a host shared with other work)."""
    if stat not in STATS:
        raise ValueError(f"stat={stat!r} must be one of {STATS}")
    fn()  # warm-up (allocations, kernel selection)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times) if stat == "best" else statistics.median(times)


def measure_linear(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...],
                   width: int, repeats: int = 3, stat: str = "best") -> dict[int, float]:
    """Training FLOP/s of a linear layer, [m, width] x [width, width] forward plus both
    backward matmuls (autograd, so the transposed layouts are the ones training runs),
    6 m width^2 FLOPs, for each m in `sizes` (best or median of `repeats`)."""
    out = {}
    w = torch.randn(width, width, device=device, dtype=dtype, requires_grad=True)
    for m in sizes:
        x = torch.randn(m, width, device=device, dtype=dtype, requires_grad=True)
        g = torch.ones(m, width, device=device, dtype=dtype)
        reps = max(1, int(3e8 // (6 * m * width * width)))  # ~0.3 GFLOP per timing on CPU

        def run(x=x, g=g, reps=reps):
            for _ in range(reps):
                torch.nn.functional.linear(x, w).backward(g)
        out[m] = 6.0 * m * width * width * reps / _best_time(run, device, repeats, stat)
    return out


def measure_op_overhead(device: torch.device, n: int = 200, repeats: int = 3,
                        stat: str = "best") -> float:
    """Seconds per operator of a chain of tiny autograd ops (forward + backward): the
    framework's dispatch cost, which dominates ops on small tensors."""
    x = torch.ones(8, device=device, requires_grad=True)

    def run():
        y = x
        for _ in range(n):
            y = y * 1.0001
        y.sum().backward()
    return _best_time(run, device, repeats, stat) / (2 * n)


def fit_n_half(rates: dict[int, float]) -> tuple[float, float]:
    """(peak, n_half) of rate(n) = peak * n / (n + n_half), from measured rates: the peak
    is the best rate, n_half the median of n * (peak / rate - 1) over the smaller sizes."""
    peak = max(rates.values())
    halves = [n * (peak / r - 1.0) for n, r in rates.items() if r < peak]
    return peak, (statistics.median(halves) if halves else 0.0)


def measure_copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 3,
                           stat: str = "best") -> float:
    """Bytes/s of a device-memory copy (read + write counted)."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return 2.0 * nbytes / _best_time(lambda: dst.copy_(src), device, repeats, stat)


def measure_host_share(group, device: torch.device, dtype: torch.dtype, width: int,
                       repeats: int = 3, stat: str = "best", pairs: int = 5) -> float:
    """Each rank's matmul rate while every rank of `group` computes, over rank 0's rate
    alone (the others wait in a barrier, which sleeps), capped at 1: 1 with a device
    (or a core) per rank, about cores / ranks on a host with fewer cores than ranks.
    Alone and together alternate `pairs` times; the median ratio is kept (one noisy
    probe on a shared host must not decide it)."""
    rows = width // 2

    def rate():
        return measure_linear(device, dtype, (rows,), width, repeats, stat)[rows]

    first = dist.get_global_rank(group, 0) if group is not None else 0
    ratios = []
    for _ in range(pairs):
        dist.barrier(group)
        alone = rate() if dist.get_rank() == first else 0.0
        dist.barrier(group)
        vals = torch.tensor([alone, rate()], dtype=torch.float64, device=_comm_device(group))
        dist.all_reduce(vals, group=group)
        ratios.append(vals[1].item() / dist.get_world_size(group) / vals[0].item())
    return min(1.0, statistics.median(ratios))


def measure_sync(group, device: torch.device, iters: int = 12, repeats: int = 5,
                 stat: str = "best") -> tuple[float, float]:
    """(latency, straggler) of collectives between computations, as training runs them:
    ranks alternate a matmul and a 64 KB all-reduce (activation-sized: gloo answers a
    few bytes on a path several times faster, which activations never take) and time
    what they spend inside the all-reduce, after a short and after a 4x longer matmul
    (~1 and ~4 ms on a CPU), and fit  wait = latency + straggler * (compute since the
    last collective); the bytes' own transfer time is left in the latency.
    On dedicated devices the wait is the collective's latency and the straggler term
    ~0; on a host whose ranks are time-sliced (more ranks than cores, other tenants)
    ranks progress unevenly and every synchronisation waits for the slowest, longer
    the more work came before it (back-to-back collectives show neither). Each repeat
    measures both lengths and gives one fit; `stat` picks over the repeats."""
    cuda = device.type == "cuda"
    width = 4096 if cuda else 512
    w = torch.randn(width, width, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    comm = _comm_device(group)
    msg = torch.ones(16384, device=comm)
    a = torch.randn(width // 4, width, device=device, dtype=w.dtype)

    def run(chunks: int) -> tuple[float, float]:
        """(seconds inside the all-reduce, seconds of matmul) per iteration."""
        dist.barrier(group)
        _sync(device)
        inside, t0 = 0.0, time.perf_counter()
        for _ in range(iters):
            for _ in range(chunks):
                a @ w
            _sync(device)
            t1 = time.perf_counter()
            dist.all_reduce(msg, group=group)
            _sync(device)
            inside += time.perf_counter() - t1
        return inside / iters, (time.perf_counter() - t0 - inside) / iters

    def fit(wait_s, work_s, wait_l, work_l) -> tuple[float, float]:
        straggler = max(0.0, (wait_l - wait_s) / max(work_l - work_s, 1e-9))
        return max(0.0, wait_s - straggler * work_s), straggler

    run(1)
    samples = []
    for _ in range(repeats):
        # the step's pace is the ranks' mean: average over the group
        vals = torch.tensor([*run(1), *run(4)], dtype=torch.float64, device=comm)
        dist.all_reduce(vals, group=group)
        samples.append((vals / dist.get_world_size(group)).tolist())
    if stat == "best":
        fits = [fit(*x) for x in samples]
        return min(f[0] for f in fits), min(f[1] for f in fits)
    # shared host: a step holds many synchronisations, so it pays their MEAN wait, and
    # the waits are skewed (now and then a rank loses a whole time slice): fit the means
    return fit(*(statistics.fmean(col) for col in zip(*samples)))


def measure_collectives(group=None, nbytes: int = 8 << 20, repeats: int = 3,
                        stat: str = "best") -> dict:
    """Collective over `group` (every member must call it): the latency of a one-element
    all-reduce and the straggler term (measure_sync), all-reduce bus bandwidth
    2 (n - 1) / n * bytes / (time - latency) (comparable to a link's per-direction
    bandwidth), and ring P2P bandwidth (each rank sends `nbytes` to the next and
    receives from the previous at once). Needs an initialised process group."""
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    device = _comm_device(group)
    buf = torch.ones(nbytes // 4, device=device)

    def all_reduce():
        dist.all_reduce(buf, group=group)

    out = {"world": n, "allreduce_bw": float("inf"), "p2p_bw": float("inf"), "latency": 0.0,
           "straggler": 0.0}
    if n == 1:
        return out
    tiny = torch.ones(1, device=device)
    lat = _best_time(lambda: dist.all_reduce(tiny, group=group), device, 4 * repeats, stat)
    sync_latency, out["straggler"] = measure_sync(group, device, repeats=repeats, stat=stat)
    out["latency"] = max(lat, sync_latency)

    def transfer(seconds: float) -> float:
        # the fixed cost is modelled apart; keep at least a tenth for the bytes
        return max(seconds - lat, 0.1 * seconds)

    t = _best_time(all_reduce, device, repeats, stat)
    out["allreduce_bw"] = 2.0 * (n - 1) / n * nbytes / transfer(t)
    recv = torch.empty_like(buf)
    nxt = dist.get_global_rank(group, (rank + 1) % n) if group is not None else (rank + 1) % n
    prv = dist.get_global_rank(group, (rank - 1) % n) if group is not None else (rank - 1) % n

    def ring():
        ops = [dist.P2POp(dist.isend, buf, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    out["p2p_bw"] = nbytes / transfer(_best_time(ring, device, repeats, stat))
    # every rank reports the slowest rank's figures
    vals = torch.tensor([out["allreduce_bw"], out["p2p_bw"], -out["latency"]],
                        dtype=torch.float64, device=device)
    dist.all_reduce(vals, op=dist.ReduceOp.MIN, group=group)
    out["allreduce_bw"], out["p2p_bw"], out["latency"] = vals[0].item(), vals[1].item(), \
        -vals[2].item()
    return out


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GB


def calibrate(device: torch.device | str | None = None, group=None, repeats: int = 5,
              sizes: tuple[int, ...] | None = None, stat: str = "best") -> DeviceProfile:
    """Measure this device: linear-layer training throughput (torch matmuls, fp32 on CPU,
    bf16 on CUDA) at several sizes, memory copy bandwidth, per-operator dispatch cost,
    and -- when a process group is up (every rank must then
    call this) -- all-reduce and P2P bandwidth. Without a process group the link figures
    are the memory copy bandwidth (one process: nothing crosses a link).

    With a process group (every rank calls this) the group's first rank measures the
    rates alone while the others sleep in a barrier, and broadcasts them; then all ranks
    compute at once to find `host_cores`, how many of them the host runs at that rate
    together (measure_host_share: a GPU node gives each its own device, a CPU host with
    fewer cores than ranks, or other tenants, does not; calibrating ranks one after the
    other would credit each with the whole host), and the collectives' latency between
    computations and the straggler term (measure_sync). stat: "best" of the repeats (a
    dedicated device), or "median" (a host shared with other work, where the best repeat
    is a quiet moment the training steps rarely see)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    width = 4096 if cuda else 512
    sizes = sizes or ((64, 256, 1024, 4096, 16384) if cuda else (16, 64, 256, 1024))
    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    first = (dist.get_global_rank(group, 0) if group is not None else 0) if grouped else 0
    figures = torch.zeros(4, dtype=torch.float64,
                          device=_comm_device(group) if grouped else "cpu")
    if grouped:
        dist.barrier(group)        # the others sleep here while the first rank measures
    if not grouped or dist.get_rank() == first:
        peak, n_half = fit_n_half(measure_linear(device, dtype, sizes, width, repeats, stat))
        mem_bw = measure_copy_bandwidth(device, (256 << 20) if cuda else (32 << 20), repeats,
                                        stat)
        figures = torch.tensor([peak, n_half, mem_bw,
                                measure_op_overhead(device, repeats=repeats, stat=stat)],
                               dtype=torch.float64, device=figures.device)
    host_cores = 0.0
    if grouped:
        # one rank's figures for all; then how many ranks the host runs at that rate at
        # once (the planner slows layouts down when more than that compute together)
        dist.broadcast(figures, first, group=group)
        host_cores = dist.get_world_size(group) * measure_host_share(
            group, device, dtype, width, repeats, stat)
    peak, n_half, mem_bw, op_overhead = figures.tolist()
    intra = inter = mem_bw
    p2p, latency, straggler, native_rs = None, 0.0, 0.0, True
    if dist.is_available() and dist.is_initialized():
        c = measure_collectives(group, repeats=repeats, stat=stat)
        if c["world"] > 1:
            intra = inter = c["allreduce_bw"]
            p2p, latency, straggler = c["p2p_bw"], c["latency"], c["straggler"]
        native_rs = dist.get_backend(group) != "gloo"
    memory = (torch.cuda.get_device_properties(device).total_memory if cuda
              else _physical_memory())
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return DeviceProfile(name=f"{name} (measured)", flops=peak, memory_bytes=memory,
                         intra_bw=intra, inter_bw=inter, mem_bw=mem_bw, efficiency=1.0,
                         n_half=n_half, op_overhead=op_overhead, async_launch=cuda,
                         p2p_bw=p2p, latency=latency, straggler=straggler,
                         host_cores=host_cores,
                         native_reduce_scatter=native_rs,
                         reserved_bytes=0.0,
                         precision="bf16" if cuda else "fp32",
                         kernels="fused" if cuda else "torch", measured=True)
