"""What the planner is asked (PlanRequest) and what it may answer (Layout), and the
enumeration of every layout that is valid for a request.

A layout is valid when (G = gpus per node, B = global batch in sequences)

    tp * pp * dp = world            tp <= G (tensor parallelism stays on NVLink)
    heads % tp == 0                 every rank holds whole query heads
    groups % tp == 0 or tp % groups == 0
                                    whole KV groups per rank, or (tp > groups) each rank
                                    holds one group replicated tp / groups times
    ffn % tp == 0, vocab % tp == 0  column-parallel FFN and vocab-parallel head/embedding
    layers % (pp * vpp) == 0        equal virtual stages (engine.parallel.state.stage_layers);
                                    with PlanRequest.layer_split "balanced" or explicit
                                    counts: a split that fits (engine/parallel/split.py)
    B % (dp * mbs) == 0             m = B / (dp * mbs) microbatches per dp rank
    vpp > 1 => pp > 1 and m % pp == 0   (the interleaved schedule's requirement)

Pure integer work: no torch, no device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.parallel.rules import PLANNER_PRECISIONS, tp_problem as shard_problem
from engine.parallel.split import check_layer_split, parse_layer_split
from model.config import GLMConfig

PRECISIONS = PLANNER_PRECISIONS
KERNELS = ("fused", "torch")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


@dataclass
class PlanRequest:
    """One planning question. `config` may be a GLMConfig or a preset name."""
    config: GLMConfig | str
    world_size: int
    device_memory_gb: float             # per device, 1 GB = 1e9 bytes
    seq_len: int
    global_batch: int                   # sequences per optimizer step, all dp ranks
    gpus_per_node: int = 8
    precision: str = "bf16"             # bf16: bf16 params, fp32 grads/master/moments
    kernels: str = "fused"              # fused: Triton flash attention etc.; torch: reference
    sequence_parallel: bool = True      # norms / residual sharded over tp when tp > 1
    max_micro_batch: int = 16
    max_vpp: int = 8
    zero_stages: tuple[int, ...] = (0, 1, 2)
    recompute: tuple[bool, ...] = (False, True)
    layer_split: str = "even"           # parallel.layer_split of the run being planned
    model_name: str = field(default="", init=False)

    def __post_init__(self):
        if isinstance(self.config, str):
            self.model_name = self.config
            self.config = GLMConfig.preset(self.config)
        elif not isinstance(self.config, GLMConfig):
            raise ValueError(f"config={self.config!r} must be a GLMConfig or a preset name")
        for name in ("world_size", "seq_len", "global_batch", "gpus_per_node",
                     "max_micro_batch", "max_vpp"):
            _positive_int(name, getattr(self, name))
        if not self.device_memory_gb > 0:
            raise ValueError(f"device_memory_gb={self.device_memory_gb} must be positive")
        if self.seq_len > self.config.seq_length:
            raise ValueError(f"seq_len={self.seq_len} exceeds the model's "
                             f"seq_length={self.config.seq_length}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {PRECISIONS}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels={self.kernels!r} must be one of {KERNELS}")
        self.zero_stages = tuple(self.zero_stages)
        if not self.zero_stages or any(z not in (0, 1, 2) for z in self.zero_stages):
            raise ValueError(f"zero_stages={self.zero_stages} must be a non-empty subset of "
                             "(0, 1, 2)")
        parse_layer_split(self.layer_split)
        self.recompute = tuple(bool(r) for r in self.recompute)
        if not self.recompute:
            raise ValueError("recompute must list at least one of False, True")

    @property
    def device_memory_bytes(self) -> float:
        return self.device_memory_gb * 1e9


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    vpp: int
    micro_batch_size: int
    num_microbatches: int               # per dp rank and step
    recompute: bool
    zero_stage: int
    sequence_parallel: bool = False     # only ever True with tp > 1
    zero_bubble: bool = False           # ZB-H1 instead of 1F1B (pp > 1, vpp == 1), ZB-V
    #                                     instead of interleaved (vpp == 2)

    @property
    def schedule(self) -> str:
        if self.pp == 1:
            return "none"
        if self.vpp > 1:
            return "zb-v" if self.zero_bubble and self.vpp == 2 else "interleaved"
        return "zb-h1" if self.zero_bubble else "1f1b"

    def as_dict(self) -> dict:
        """The ParallelConfig / TrainConfig fields a runner needs to build this layout."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "vpp": self.vpp,
                "micro_batch_size": self.micro_batch_size,
                "num_microbatches": self.num_microbatches, "recompute": self.recompute,
                "zero_stage": self.zero_stage, "schedule": self.schedule,
                "sequence_parallel": self.sequence_parallel}

    def short(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}", f"dp{self.dp}"]
        if self.vpp > 1:
            parts.append(f"v{self.vpp}")
        parts.append(f"mbs{self.micro_batch_size}x{self.num_microbatches}")
        if self.recompute:
            parts.append("rc")
        if self.zero_stage:
            parts.append(f"z{self.zero_stage}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.zero_bubble and self.schedule in ("zb-h1", "zb-v"):
            parts.append("zb")
        return " ".join(parts)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_problem(cfg: GLMConfig, tp: int, gpus_per_node: int) -> str | None:
    """Why `tp` cannot shard this model (None when it can)."""
    if tp > gpus_per_node:
        return f"tp={tp} > gpus_per_node={gpus_per_node}"
    return shard_problem(cfg, tp)


def split_problem(cfg: GLMConfig, pp: int, vpp: int, split: str) -> str | None:
    """Why `split` cannot cut the model into pp * vpp virtual stages (None when it can)."""
    if split == "even":
        return None if cfg.num_layers % (pp * vpp) == 0 else \
            f"num_layers={cfg.num_layers} is not divisible by pp={pp}"
    try:
        check_layer_split(cfg.num_layers, pp * vpp, split)
    except ValueError as err:
        return str(err)
    return None


def enumerate_layouts(req: PlanRequest) -> list[Layout]:
    """Every valid layout for the request. Raises ValueError naming what blocks each
    (tp, pp) when there is none."""
    cfg, world, B = req.config, req.world_size, req.global_batch
    out: list[Layout] = []
    problems: list[str] = []
    for tp in _divisors(world):
        why = tp_problem(cfg, tp, req.gpus_per_node)
        if why:
            problems.append(why)
            continue
        for pp in _divisors(world // tp):
            dp = world // (tp * pp)
            vpps = [v for v in range(1, (req.max_vpp if pp > 1 else 1) + 1)
                    if not split_problem(cfg, pp, v, req.layer_split)]
            if not vpps:
                problems.append(split_problem(cfg, pp, 1, req.layer_split))
                continue
            if B % dp:
                problems.append(f"global_batch={B} is not divisible by dp={dp} "
                                f"(tp={tp}, pp={pp})")
                continue
            mbss = [b for b in _divisors(B // dp) if b <= req.max_micro_batch]
            for vpp in vpps:
                for mbs in mbss:
                    m = B // (dp * mbs)
                    # one stage per rank: 1F1B, and ZB-H1 (same peak memory on stage 0,
                    # a third of the bubble, W-pending on the others); two chunks:
                    # interleaved (m a multiple of pp) and ZB-V (any m, 1F1B's memory)
                    zbs = (False, True) if pp > 1 and vpp <= 2 else (False,)
                    if vpp > 1 and m % pp:
                        zbs = (True,) if vpp == 2 else ()
                    for rc in req.recompute:
                        # ZeRO shards over dp: with dp == 1 every stage is ZeRO 0, so
                        # that is the one listed (whatever zero_stages asks for)
                        for z in (req.zero_stages if dp > 1 else (0,)):
                            for zb in zbs:
                                out.append(Layout(tp, pp, dp, vpp, mbs, m, rc, z,
                                                  req.sequence_parallel and tp > 1, zb))
    if not out:
        detail = "; ".join(dict.fromkeys(problems)) or "no micro-batch size fits"
        raise ValueError(f"no valid layout for world_size={world}, global_batch={B}, "
                         f"max_micro_batch={req.max_micro_batch}: {detail}")
    return out
