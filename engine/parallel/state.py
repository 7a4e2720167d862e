"""Parallel layout (tp, pp, dp, vpp): rank math as pure functions, process groups from torchrun.

Rank order is Megatron's "tp-dp-pp": tensor-parallel rank varies fastest, then the
data-parallel rank, then the pipeline stage,

    rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so the ranks of one tensor-parallel group are adjacent (on one node, where the heaviest
traffic is) and a pipeline group strides across the whole world. Everything above
`init_distributed` is plain integer math and is tested without a process group.

Interleaved pipelines (vpp > 1) give each stage vpp model chunks: the model is cut into
pp * vpp virtual stages (equally deep unless parallel.layer_split says otherwise:
engine/parallel/split.py) and chunk c of stage s holds virtual stage c * pp + s, so
activations loop around the ring of stages vpp times.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.parallel.split import check_layer_split, layer_ranges

DIMS = ("tp", "dp", "pp")  # fastest-varying first


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1     # model chunks per pipeline stage (interleaved 1F1B)

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "vpp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"vpp={self.vpp} needs pipeline parallelism (pp > 1); got pp=1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def virtual_stages(self) -> int:
        return self.pp * self.vpp

    def validate(self, world_size: int, num_layers: int | None = None,
                 layer_split="even") -> "ParallelDims":
        """Check the layout against a world and a model before any work is done.
        layer_split: parallel.layer_split ("balanced" only needs a layer per stage)."""
        if self.world_size != world_size:
            raise ValueError(f"tp*pp*dp={self.world_size} does not equal world size {world_size}")
        if num_layers is not None:
            check_layer_split(num_layers, self.virtual_stages, layer_split)
        return self


@dataclass(frozen=True)
class Coords:
    """Where one rank sits in the layout."""
    tp: int
    dp: int
    pp: int


def _sizes(dims: ParallelDims) -> dict[str, int]:
    return {"tp": dims.tp, "dp": dims.dp, "pp": dims.pp}


def rank_to_coords(rank: int, dims: ParallelDims) -> Coords:
    if not 0 <= rank < dims.world_size:
        raise ValueError(f"rank={rank} is outside world size {dims.world_size}")
    tp_rank = rank % dims.tp
    dp_rank = (rank // dims.tp) % dims.dp
    pp_rank = rank // (dims.tp * dims.dp)
    return Coords(tp=tp_rank, dp=dp_rank, pp=pp_rank)


def coords_to_rank(coords: Coords, dims: ParallelDims) -> int:
    for name, size in _sizes(dims).items():
        if not 0 <= getattr(coords, name) < size:
            raise ValueError(f"coords.{name}={getattr(coords, name)} is outside {name}={size}")
    return coords.tp + dims.tp * (coords.dp + dims.dp * coords.pp)


def rank_groups(dims: ParallelDims, dim: str) -> list[list[int]]:
    """All groups of ranks that differ only in `dim` ("tp", "dp" or "pp"), each sorted by
    that coordinate (so a pp group lists stage 0 first). Groups are listed in order of
    their lowest rank; every rank is in exactly one group per dimension."""
    if dim not in DIMS:
        raise ValueError(f"dim={dim!r} must be one of {', '.join(DIMS)}")
    sizes = _sizes(dims)
    others = [d for d in DIMS if d != dim]
    groups = []
    for b in range(sizes[others[1]]):
        for a in range(sizes[others[0]]):
            base = {others[0]: a, others[1]: b}
            groups.append([coords_to_rank(Coords(**base, **{dim: i}), dims)
                           for i in range(sizes[dim])])
    return sorted(groups, key=lambda g: g[0])


def stage_layers(num_layers: int, pp: int, vpp: int, stage: int, chunk: int) -> tuple[int, int]:
    """[start, end) of the layers that chunk `chunk` of pipeline stage `stage` holds under
    the even split. Chunk c of stage s is virtual stage c * pp + s."""
    if not 0 <= stage < pp:
        raise ValueError(f"stage={stage} is outside pp={pp}")
    if not 0 <= chunk < vpp:
        raise ValueError(f"chunk={chunk} is outside vpp={vpp}")
    return layer_ranges(num_layers, pp * vpp, "even")[chunk * pp + stage]


# ---- process groups ------------------------------------------------------------------

def model_parallel_ranks(dims: ParallelDims) -> list[list[int]]:
    """The ranks holding the pieces of each model replica (same dp coordinate, any tp and
    pp), replica 0 first: the groups the optimizer sums squared gradient norms over."""
    return [[r for r in range(dims.world_size) if rank_to_coords(r, dims).dp == d]
            for d in range(dims.dp)]


def new_groups(rank_lists: list[list[int]], rank: int,
               timeout: timedelta) -> tuple[object, list[int] | None]:
    """Create one process group per list and return (group, ranks) of the one holding
    `rank` ((None, None) if none does). Every process group of the engine is made here:
    new_group is collective over the whole world, so every rank must call this with the
    same lists in the same order."""
    mine: tuple[object, list[int] | None] = (None, None)
    for ranks in rank_lists:
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = (group, ranks)
    return mine


@dataclass
class ParallelState:
    """This rank's place in the layout and its groups; passed around explicitly.
    ParallelState.single() is one process: tp = pp = dp = 1, no process group, and the
    collectives below do nothing, so code reads state.dims / state.coords either way."""
    dims: ParallelDims
    rank: int
    coords: Coords
    device: torch.device
    backend: str
    timeout: timedelta
    tp_group: object
    dp_group: object
    pp_group: object
    tp_ranks: list[int]
    dp_ranks: list[int]
    pp_ranks: list[int]   # global ranks of this pipeline, stage 0 first
    # False only for single(): a world of one joined by init_distributed is still True
    distributed: bool = True

    @classmethod
    def single(cls, device=None) -> "ParallelState":
        """One process, no process group. device: the default device (CUDA when there
        is one, else the CPU) unless given."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(dims=ParallelDims(), rank=0, coords=Coords(0, 0, 0), device=device,
                   backend="none", timeout=timedelta(seconds=120), tp_group=None,
                   dp_group=None, pp_group=None, tp_ranks=[0], dp_ranks=[0], pp_ranks=[0],
                   distributed=False)

    @property
    def stage(self) -> int:
        return self.coords.pp

    @property
    def is_first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords.pp == self.dims.pp - 1

    @property
    def prev_rank(self) -> int:
        return self.pp_ranks[(self.coords.pp - 1) % self.dims.pp]

    @property
    def next_rank(self) -> int:
        return self.pp_ranks[(self.coords.pp + 1) % self.dims.pp]

    @property
    def multi_rank(self) -> bool:
        """More than one process in the job (so collectives over it do something)."""
        return self.distributed and dist.is_initialized() and dist.get_world_size() > 1

    # ---- whole-job collectives (no-ops for the single process) ------------------------
    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj) -> list:
        """Every rank's obj, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.dims.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Rank src's obj on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def or_single(state: ParallelState | None, device=None) -> ParallelState:
    """The one place where "no state" means the single process: for entry points that
    callers (and tests) may call without a state."""
    return state if state is not None else ParallelState.single(device)


def _device_and_backend() -> tuple[torch.device, str]:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)  # NCCL P2P hangs without a current device
        return device, "nccl"
    return torch.device("cpu"), "gloo"


def _backstop(timeout: timedelta, backend: str) -> timedelta:
    """The groups' own timeout. NCCL: our deadline is the heartbeat monitor's (engine/
    monitor.py) and the watchdog is the backstop, so it also allows for the first step's
    JIT compiles."""
    if backend != "nccl":
        return timeout
    from engine.parallel.monitor import FIRST_STEP_ALLOWANCE_S
    return timeout + timedelta(seconds=FIRST_STEP_ALLOWANCE_S)


def build_state(dims: ParallelDims, rank: int, device: torch.device, backend: str,
                timeout: timedelta, group_timeout: timedelta | None = None
                ) -> ParallelState | None:
    """Create every tp / dp / pp group of `dims` (in that order; collective over the
    whole world) and return this rank's state, None for a rank outside the layout (a
    layout on the first ranks of a larger job)."""
    group_timeout = group_timeout or timeout
    mine = {dim: new_groups(rank_groups(dims, dim), rank, group_timeout)
            for dim in ("tp", "dp", "pp")}
    if rank >= dims.world_size:
        return None
    return ParallelState(dims=dims, rank=rank, coords=rank_to_coords(rank, dims), device=device,
                         backend=backend, timeout=timeout,
                         tp_group=mine["tp"][0], dp_group=mine["dp"][0], pp_group=mine["pp"][0],
                         tp_ranks=mine["tp"][1], dp_ranks=mine["dp"][1], pp_ranks=mine["pp"][1])


def init_distributed(dims: ParallelDims, timeout: timedelta | float = 120.0,
                     num_layers: int | None = None, layer_split="even") -> ParallelState:
    """Join (or reuse) the default process group from the torchrun environment, check the
    layout, and create every tp / dp / pp group.

    new_group is collective over the whole world, so every rank creates every group, in the
    same order (tp groups, then dp, then pp), and keeps the ones it belongs to. The layout
    is validated before any group exists, so an impossible layout fails on every rank
    without a collective that could hang (num_layers and layer_split: the model's
    split, see ParallelDims.validate)."""
    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    device, backend = _device_and_backend()
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        dims.validate(world, num_layers, layer_split)
        backend = dist.get_backend()
        if backend != "nccl":
            device = torch.device("cpu")
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dims.validate(world, num_layers, layer_split)
        dist.init_process_group(backend, timeout=_backstop(timeout, backend), device_id=device
                                if device.type == "cuda" else None)
        rank = dist.get_rank()
    return build_state(dims, rank, device, backend, timeout, _backstop(timeout, backend))


def model_parallel_group(state: ParallelState):
    """This rank's model-parallel group (model_parallel_ranks), None when one rank holds
    the whole model. Collective: every rank calls it at the same point."""
    if state.dims.tp * state.dims.pp == 1:
        return None
    return new_groups(model_parallel_ranks(state.dims), state.rank, state.timeout)[0]
