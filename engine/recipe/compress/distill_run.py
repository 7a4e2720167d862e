"""Wiring a distillation run onto the engine's Trainer, in any tp x pp x dp layout.

The student is an ordinary run: cfg.model is its shape and cfg.train.init_from its
checkpoint (empty: from scratch), so the Trainer builds, loads and TP-shards this rank's
stages like any pretraining run. The objective is DistillLoss.forward_step, computed on
the stage that holds the head: the last one, or stage 0 when schedule "zb-v" puts the
chunks in a V (engine/pipeline/placement.py; "the last stage" below means that stage).
The hidden-state projection is trained there too, as the aux module
"proj": replicated over TP, so it counts once in the global grad norm, and under
sequence parallelism (each rank's hidden term covers its own sequence rows) its
gradient is summed over the TP group like a norm weight's.

Where the frozen teacher runs is distill.teacher_layout (DistillConfig explains the
choice):
  "same"  StagedTeacher: this rank's stages of the teacher, built, loaded by name and
          TP-sharded with the same functions the Trainer uses for the student. Before
          each training step (the Trainer's before_step hook: every rank, same point) it
          runs forward-only over the step's microbatches with the engine's forward-only
          schedule over the same pipeline group, and the last stage keeps the teacher's
          final hidden state per microbatch ([s, b, h]; [s/tp, b, h] under sequence
          parallelism). Logits come from it with the teacher's own head, on the last
          stage, when the KL needs them; vocabulary shards line up with the student's
          because both heads split the same padded vocabulary by the same TP rank. The
          teacher's and the student's traffic never mix on the shared group: every
          stage finishes its teacher pass before the student step's pipeline handshake.
  "last"  WholeTeacher: the whole teacher on the last stage's ranks only.

Per-term logging: the Trainer's log_terms hook calls DistillLoss.pop_stats(state) on
every rank at each log line (one all-reduce over the job), so rank 0 logs the job's
per-token means of each term even when it is not on the last stage.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.train import checkpoint as ckpt_lib
from engine.recipe.compress.distill import (DistillConfig, DistillLoss, TPShards, WholeTeacher,
                                     freeze, head_logits, make_projection)
from engine.config import RunConfig
from model import GLM, GLMConfig


def schedule_of(cfg: RunConfig, state) -> str:
    """The schedule the Trainer runs (its rule: "none" on a single stage)."""
    return cfg.parallel.schedule if state.dims.pp > 1 else "none"


def is_head_stage(state, schedule: str) -> bool:
    """Whether this rank's stage holds the final norm, the head and so the loss: the
    placement's answer (the last stage, stage 0 in the V), not always the last stage."""
    from engine.pipeline.placement import holds_head
    return holds_head(schedule, state.dims.pp, state.coords.pp)


def tp_shards(state, sequence_parallel: bool) -> TPShards | None:
    if state.dims.tp == 1:
        return None
    return TPShards(state.tp_group, state.coords.tp, state.dims.tp, bool(sequence_parallel))


def teacher_weights(teacher):
    """(GLMConfig, load) for a teacher given as a checkpoint (path or Checkpoint) or a
    whole GLM in memory: load(module) fills any stage of the teacher, or all of it, by
    parameter name (what a stage holds is named as in the whole model)."""
    if isinstance(teacher, nn.Module):
        full = dict(teacher.named_parameters())

        @torch.no_grad()
        def load(module):
            for name, p in module.named_parameters():
                p.copy_(full[name])
        return teacher.config, load
    ckpt = teacher if isinstance(teacher, ckpt_lib.Checkpoint) else ckpt_lib.Checkpoint(teacher)
    try:
        config = GLMConfig.from_dict(ckpt.meta["config"]["model"])
    except (KeyError, TypeError):
        raise ckpt_lib.CheckpointError(f"teacher checkpoint {ckpt.path} has no model config "
                                       "in meta.json") from None
    return config, lambda module: ckpt_lib.load_model_weights(module, ckpt)


def staged(dcfg: DistillConfig, state) -> bool:
    """Whether the teacher is split into stages / TP shards: "same" with more than one
    stage or TP (with neither, "same" and "last" are the same whole teacher)."""
    return dcfg.teacher_layout == "same" and state.dims.pp * state.dims.tp > 1


def check_teacher(t_config: GLMConfig, cfg: RunConfig, dcfg: DistillConfig, state):
    """One-line errors, from configs alone, so every rank fails alike before any work."""
    from engine.tensor_parallel import ShardPlan
    if t_config.padded_vocab_size != cfg.model.padded_vocab_size:
        raise ValueError(f"teacher vocab {t_config.padded_vocab_size} != student vocab "
                         f"{cfg.model.padded_vocab_size}")
    if t_config.position_layout != cfg.model.position_layout:
        # both read the same batches: one layout feeds both
        raise ValueError(f"teacher position_layout {t_config.position_layout!r} != student "
                         f"{cfg.model.position_layout!r}")
    if not staged(dcfg, state):
        return
    whole = "(distill.teacher_layout 'last' keeps it whole)"
    try:
        teacher_layer_split(t_config, cfg, state)
    except ValueError as err:
        raise ValueError(f"distill.teacher_layout='same' splits the teacher like the "
                         f"student, but {err} {whole}") from None
    if state.dims.tp > 1:
        try:
            ShardPlan(t_config, state.dims.tp)
        except ValueError as err:
            raise ValueError(f"distill.teacher_layout='same' shards the teacher over "
                             f"tp={state.dims.tp}, but its {err} {whole}") from None


def teacher_layer_split(t_config: GLMConfig, cfg: RunConfig, state) -> tuple[int, ...]:
    """The staged teacher's layers per virtual stage: the student's parallel.layer_split
    applied to the teacher ("balanced" by the teacher's own costs; explicit counts must
    fit its layers), in the student's placement, so each stage's teacher and student
    chunks hold the same virtual stage, the head's included."""
    from engine.train.layer_split import resolve_layer_split
    return resolve_layer_split(t_config, cfg.train.seq_len, state.dims.pp, state.dims.vpp,
                               cfg.parallel.schedule, cfg.parallel.layer_split)


def build_teacher_stage(t_config: GLMConfig, load, state, sequence_parallel: bool,
                        schedule: str | None = None, layer_split="even") -> list:
    """This rank's chunks of the teacher, made as the Trainer makes the student's
    (build_stage with the student's schedule, so the same placement, and the split of
    teacher_layer_split; load by name, parallelize), then frozen: sharding first,
    because parallelize registers gradient hooks, which frozen parameters refuse."""
    from engine.pipeline.stage import build_stage
    from engine.tensor_parallel import parallelize
    chunks = build_stage(t_config, state.dims.pp, state.dims.vpp, state.coords.pp,
                         device=state.device, schedule=schedule, layer_split=layer_split)
    for chunk in chunks:
        load(chunk)
        if state.dims.tp > 1:
            parallelize(chunk, state.tp_group, sequence_parallel=sequence_parallel)
        freeze(chunk)
    return chunks


class StagedTeacher:
    """teacher_layout "same": the teacher split like the student (see the module
    docstring). `run(microbatches)` is collective over the pipeline (every rank, before
    the student's step); `outputs(batch, side)` then gives the last stage this rank's
    (logits | None, final hidden) for each of those microbatches, once."""

    def __init__(self, chunks: list, state, need_logits: bool, sequence_parallel: bool):
        from engine.pipeline.p2p import P2P
        self.chunks, self.state, self.need_logits = chunks, state, need_logits
        self.schedule, self.autocast = "none", None     # the student's: see attach
        self.comm = None
        if state.dims.pp > 1:
            self.comm = P2P(state, chunks[0].config.hidden_size,
                            dtype=next(chunks[0].parameters()).dtype,
                            seq_shards=state.dims.tp if sequence_parallel else 1)
        # the head's chunk (the one the placement made post_process: the last stage's
        # last chunk, or chunk 1 of stage 0 in the V) stops at the final norm
        # (GLM.hidden): no logits are formed there (without labels GLM.forward would
        # gather every vocabulary row on each TP rank); outputs() applies the head when
        # the KL needs it
        self.head_chunk = next((c for c in chunks if c.post_process), None)
        self._hidden: dict[int, torch.Tensor] = {}

    def attach(self, trainer):
        """Run under the student's schedule (it fits the layout) and autocast."""
        self.schedule, self.autocast = trainer.schedule, trainer.autocast

    def run(self, microbatches: list[dict]):
        from engine.pipeline.schedules import StepContext, forward_backward
        # without labels the schedule's last stage only collects outputs (no loss sums)
        inputs = [{k: v for k, v in mb.items() if k != "labels"} for mb in microbatches]
        hidden: list[torch.Tensor] = []
        forward_backward(StepContext(self.schedule, self.chunks, inputs, 1, self.comm,
                                     self.state, forward_only=True,
                                     forward_step=self._forward_step,
                                     autocast=self.autocast, outputs=hidden))
        # keyed by the student's batch objects: the student's forward_step gets the same
        self._hidden = dict(zip(map(id, microbatches), hidden))

    def _forward_step(self, chunk, batch, hidden_states, side):
        from engine.pipeline.stage import glm_forward_step
        if chunk is not self.head_chunk:
            return glm_forward_step(chunk, batch, hidden_states, side)
        input_ids = batch["input_ids"].to(side.position_ids.device) if chunk.pre_process \
            else None
        return chunk.hidden(input_ids, hidden_states=hidden_states,
                            position_ids=side.position_ids,
                            block_position_ids=side.block_position_ids,
                            prefix_lens=side.prefix_lens, doc_starts=side.doc_starts)

    def outputs(self, batch: dict, side):
        hidden = self._hidden.pop(id(batch))
        logits = head_logits(self.head_chunk.output_layer, hidden) if self.need_logits else None
        return logits, hidden


def _whole_teacher(teacher, t_config: GLMConfig, load) -> nn.Module:
    if isinstance(teacher, nn.Module):
        return teacher
    model = GLM.build(t_config)
    load(model)
    return model


def _projection(cfg: RunConfig, t_config: GLMConfig, kept_hidden, tp: TPShards | None,
                device, log):
    from engine.tensor_parallel.mappings import all_reduce_grad_hook
    hs, ht = cfg.model.hidden_size, t_config.hidden_size
    if hs == ht:
        return None
    fits = kept_hidden is not None and len(kept_hidden) == hs and max(kept_hidden) < ht
    proj = make_projection(hs, ht, kept_hidden if fits else None).to(device)
    log(f"hidden projection {hs} -> {ht} "
        f"({'the pruning channel selection' if fits else 'random init'})")
    if tp is not None:
        proj.weight.tp_replicated = True       # once in the global grad norm
        if tp.sequence_parallel:               # each rank's part covers its own rows
            proj.weight.register_hook(all_reduce_grad_hook(tp.group))
    return proj


def distill_trainer(cfg: RunConfig, dcfg: DistillConfig, train, dev=None, *,
                    teacher, kept_hidden: list[int] | None = None, state=None,
                    tokenizer_sha256: str | None = None, log=print,
                    extra_meta: dict | None = None, extra_files: dict | None = None):
    """-> (Trainer, DistillLoss). `teacher`: a checkpoint (path or Checkpoint), from
    which each rank loads only what its layout needs, or a whole GLM in memory; needed
    when a KD term has weight, on every rank for teacher_layout "same" (with pp or tp)
    and on the last stage's for "last" (others may pass None). `kept_hidden` (the
    pruning's kept teacher channels) starts the projection as that selection."""
    from engine.parallel.state import model_parallel_group, or_single
    from engine.train.trainer import Trainer

    state = or_single(state)
    sp = bool(cfg.parallel.sequence_parallel)
    tp = tp_shards(state, sp)
    device = state.device
    source = proj = None
    schedule = schedule_of(cfg, state)
    last = is_head_stage(state, schedule)   # "last": where the head is (module docstring)
    if dcfg.needs_teacher and teacher is None and (staged(dcfg, state) or last):
        raise ValueError("distill: kl_weight / hidden_weight > 0 need a teacher")
    if dcfg.needs_teacher and teacher is not None:
        t_config, load = teacher_weights(teacher)
        check_teacher(t_config, cfg, dcfg, state)
        if staged(dcfg, state):
            split = teacher_layer_split(t_config, cfg, state)
            source = StagedTeacher(build_teacher_stage(t_config, load, state, sp, schedule,
                                                       split), state,
                                   need_logits=dcfg.kl_weight > 0, sequence_parallel=sp)
        elif last:
            source = WholeTeacher(_whole_teacher(teacher, t_config, load).to(device), tp)
        if last and dcfg.hidden_weight > 0:
            proj = _projection(cfg, t_config, kept_hidden, tp, device, log)
    loss = DistillLoss(source, dcfg, proj, tp)
    trainer = Trainer.from_config(
        cfg, train, dev, state=state, tokenizer_sha256=tokenizer_sha256, log=log,
        extra_meta=extra_meta, forward_step=loss.forward_step,
        aux_modules={"proj": proj} if proj is not None else None,
        mp_group=model_parallel_group(state),
        before_step=source.run if isinstance(source, StagedTeacher) else None,
        log_terms=lambda: loss.pop_stats(state), extra_files=extra_files)
    if isinstance(source, StagedTeacher):
        source.attach(trainer)
    return trainer, loss
