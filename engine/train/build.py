"""Build what a Trainer trains, in a fixed order: this rank's stage chunks -> init_from
weights -> tensor parallel -> activation recompute -> precision -> P2P -> optimizer.

The order is part of the numerics: the chunks are initialised like the single-process
model before TP slices them, recompute wraps the TP blocks (so its replay restores their
dropout stream), and the optimizer comes last because it takes over the parameters'
storage (engine/optim/distributed.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from engine.config import RunConfig
from engine.optim import DistributedOptimizer, OptimConfig
from engine.parallel.rules import autocasts_bf16, param_precision as rules_param_precision
from engine.parallel.state import ParallelState, or_single
from engine.pipeline.stage import build_stage
from engine.train import checkpoint as ckpt_lib
from engine.train.layer_split import resolve_layer_split
from model.config import layout_mismatch


@dataclass
class Parts:
    """One rank's built training parts.

    chunks: this rank's model chunks (vpp of them; one for a single stage).
    aux_modules: trained beside the model, saved as "aux.<name>.*" (e.g. a projection).
    comm: the stages' P2P (None without a pipeline). precision: train.precision as
    configured; autocast_dtype: the compute dtype under autocast (None: no autocast)."""
    state: ParallelState     # ParallelState.single() for one process
    device: torch.device
    chunks: list
    aux_modules: torch.nn.ModuleDict
    precision: str
    autocast_dtype: torch.dtype | None
    comm: object | None
    optimizer: DistributedOptimizer

    def named_trained_parameters(self):
        return named_trained_parameters(self.chunks, self.aux_modules)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def named_trained_parameters(chunks: list, aux_modules: torch.nn.ModuleDict):
    """The optimizer's parameters in its order: the chunks', then "aux.<name>"."""
    for chunk in chunks:
        yield from ((n, p) for n, p in chunk.named_parameters() if p.requires_grad)
    for n, p in aux_modules.named_parameters():
        yield f"aux.{n}", p


def run_layer_split(cfg: RunConfig, state) -> tuple[int, ...]:
    """This run's layers per virtual stage (parallel.layer_split for its model, seq_len
    and layout; engine/train/layer_split.py)."""
    return resolve_layer_split(cfg.model, cfg.train.seq_len, state.dims.pp, state.dims.vpp,
                               cfg.parallel.schedule, cfg.parallel.layer_split)


def layout_line(cfg: RunConfig, state) -> str:
    """The startup log's layout: "tp=1 pp=2 dp=1 vpp=1 schedule=1f1b layers 5,3" (the
    layers of each virtual stage, virtual stage 0 first), or "single process"."""
    if not state.distributed:
        return "single process"
    from engine.parallel.split import format_split
    d = state.dims
    schedule = cfg.parallel.schedule if d.pp > 1 else "none"
    line = f"tp={d.tp} pp={d.pp} dp={d.dp} vpp={d.vpp} schedule={schedule}"
    if d.pp > 1:
        line += f" layers {format_split(run_layer_split(cfg, state))}"
        if cfg.parallel.layer_split == "balanced":
            line += " (balanced)"
    return line


def build_chunks(cfg: RunConfig, state, device, model=None,
                 tokenizer_sha256: str | None = None) -> list:
    """This rank's chunks, initialised like the single-process model, loaded from
    train.init_from, then tensor-parallel and recomputed as configured. `model`: a ready
    whole model to use instead (single stage only)."""
    tc, pc = cfg.train, cfg.parallel
    pp, stage = state.dims.pp, state.coords.pp
    if model is not None:
        if pp > 1:
            raise ValueError("model=... takes a whole model; with pp > 1 the stages are "
                             "built from cfg.model")
        chunks = [model.to(device)]
    else:
        chunks = build_stage(cfg.model, pp, state.dims.vpp, stage, seed=tc.seed,
                             device=device, schedule=pc.schedule,
                             layer_split=run_layer_split(cfg, state))
    if tc.init_from:
        ckpt = ckpt_lib.Checkpoint(tc.init_from)
        ckpt.check_tokenizer(tokenizer_sha256)
        # same shapes are not enough: an imported ChatGLM is causal 1D (model/config.py)
        wrong = layout_mismatch(cfg.model, ckpt.meta.get("config", {}).get("model", {}))
        if wrong:
            raise ValueError(f"train.init_from {tc.init_from}: {wrong}")
        for chunk in chunks:
            ckpt_lib.load_model_weights(chunk, ckpt)
    # same default generator on every rank (replicated dropout); tensor parallelism
    # keeps its own per-rank stream for sharded tensors
    torch.manual_seed(tc.seed)
    if state.dims.tp > 1:
        # TP weights are slices of the full stage just built (and loaded)
        from engine.tensor_parallel import parallelize
        for chunk in chunks:
            parallelize(chunk, state.tp_group, sequence_parallel=pc.sequence_parallel)
    if tc.recompute:
        # after parallelize: the checkpointed blocks are the TP ones, and their replay
        # restores the chunk's TP dropout stream (chunk.tp_rng) as well as the default
        from engine.train.recompute import recompute_layers
        for chunk in chunks:
            recompute_layers(chunk)
    return chunks


def precision_dtypes(precision: str, device) -> tuple[torch.dtype | None, str]:
    """train.precision -> (autocast dtype or None, parameter precision). "auto": fp32 on
    CPU; on CUDA bf16 autocast over fp32 parameters. "bf16" / "fp16": parameters and
    gradients in that dtype, fp32 master weights in the optimizer (fp16 with dynamic loss
    scaling)."""
    autocast_dtype = torch.bfloat16 if autocasts_bf16(precision, device.type) else None
    return autocast_dtype, rules_param_precision(precision)


def build_p2p(cfg: RunConfig, state, param_precision: str, autocast_dtype):
    """The stages' exchanges (None without a pipeline)."""
    pp = state.dims.pp
    if pp == 1:
        return None
    from engine.optim.config import PRECISIONS
    from engine.pipeline.p2p import P2P
    tp = state.dims.tp
    # under autocast, stages exchange in the compute dtype (half of fp32's bytes)
    return P2P(state, cfg.model.hidden_size, dtype=PRECISIONS[param_precision],
               seq_shards=tp if cfg.parallel.sequence_parallel else 1,
               wire_dtype=autocast_dtype)


def build_optimizer(cfg: RunConfig, state, named_params: list, param_precision: str,
                    mp_group=None) -> DistributedOptimizer:
    tc, pc = cfg.train, cfg.parallel
    dp, tp_rank = state.dims.dp, state.coords.tp
    return DistributedOptimizer(
        named_params,
        OptimConfig(lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                    weight_decay=tc.weight_decay, max_grad_norm=tc.grad_clip,
                    zero_stage=pc.zero_stage, precision=param_precision),
        dp_group=state.dp_group if dp > 1 else None,
        model_parallel_group=mp_group, tp_rank=tp_rank)


def build_parts(cfg: RunConfig, state=None, *, device=None, model=None,
                aux_modules: dict | None = None, mp_group=None,
                tokenizer_sha256: str | None = None) -> Parts:
    """This rank's parts for `cfg` on `state` (None: one process on `device`, default
    CUDA when available). model: a ready whole GLM instead of building one (single stage
    only). aux_modules: {name: module} trained beside it. mp_group: the model-parallel
    group for the global gradient norm (engine.train.launch.model_parallel_group).
    tokenizer_sha256: checked against train.init_from's."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    state = or_single(state, device)
    device = state.device
    chunks = build_chunks(cfg, state, device, model, tokenizer_sha256)
    aux = torch.nn.ModuleDict(aux_modules or {}).to(device)
    autocast_dtype, param_precision = precision_dtypes(cfg.train.precision, device)
    comm = build_p2p(cfg, state, param_precision, autocast_dtype)
    # the optimizer takes over the parameters' storage: build it last
    optimizer = build_optimizer(cfg, state, list(named_trained_parameters(chunks, aux)),
                                param_precision, mp_group)
    return Parts(state, device, chunks, aux, cfg.train.precision, autocast_dtype, comm,
                 optimizer)
