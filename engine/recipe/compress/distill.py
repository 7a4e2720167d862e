"""Distillation losses: a student learns from a frozen teacher.

    total = ce_weight     * CE(student logits, labels)
          + kl_weight     * T^2 * KL(softmax(teacher / T) || softmax(student / T))
          + hidden_weight * D(teacher hidden, proj(student hidden))

  D "sum_sq"  the paper's Eq. 10: 1/2 * sum over features of the squared difference
    "mse"     the normalised variant: mean over features of the squared difference
              (independent of the width, so its weight transfers across model sizes)

Every term is a per-token value summed over label tokens (labels != -100); the trainer
divides the sum by the global label count, so the loss is a per-token mean in any
layout. Positions without a label are left out of the KD terms too: their teacher
outputs were never trained (GLM puts no loss on Part A), so they carry no knowledge.

"Last-layer hidden state" is the final-normed hidden state (GLM.hidden on the last
stage) of both models. It is what the output head reads, so matching it
pulls the student's logits toward the teacher's; it has a fixed scale (unit RMS times
the norm weight) whereas the raw residual stream grows with depth and would differ
between a shallower or narrower student and its teacher; and it is what the last
pipeline stage holds anyway. When the widths differ a learned projection (student h ->
teacher h) maps the student's; for a pruned student it starts as the channel selection,
which is exact at step 0 when the pruned channels were zero.

Tensor parallelism (`TPShards`). The logits of both models are this rank's vocabulary
rows (the VocabParallelHead split; never gathered), and with sequence parallelism the
final hidden states are this rank's sequence rows. The engine's convention holds: every
TP rank ends with the same (replicated) loss and backpropagates it through its own
shards. The CE is the vocab-parallel one; the KL all-reduces each token's max, sums of
exponentials and KL (`vocab_parallel_kl`); the hidden term under sequence parallelism
sums the ranks' partial sums with a forward all-reduce whose backward is the identity
(each rank's rows get exactly their own gradient). The projection is replicated: its
gradient is whole on every rank, except under sequence parallelism where each rank's is
the part of its rows (engine.recipe.compress.distill_run sums it over the TP group).

`distill_loss` is a pure function of (student logits, student hidden, teacher logits,
teacher hidden, labels): a last pipeline stage computes it from what it holds once the
teacher's outputs for the microbatch are there. `DistillLoss.forward_step` is the
Trainer's objective (any layout); calling the DistillLoss gives a whole model's loss on
one batch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.parallel.state import or_single
from engine.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from engine.tensor_parallel.mappings import reduce_from_region
from model.parallel_protocol import mapped_input

IGNORE = -100
HIDDEN_LOSSES = ("sum_sq", "mse")
TEACHER_LAYOUTS = ("same", "last")
TERMS = ("ce", "kl", "hidden")     # the loss terms, in the order pop_stats reduces them


@dataclass
class DistillConfig:
    """teacher_layout: where the frozen teacher runs in a pipeline / tensor-parallel run.

      "same"  split like the student: stage s of the teacher on the ranks of stage s,
              TP-sharded like the student; it runs forward-only over the step's
              microbatches before the student's step and hands the last stage its final
              hidden state per microbatch. No rank holds the whole teacher, and its
              compute is spread over the stages like the student's (the default: a
              teacher is bigger than its student, so holding and running it whole next
              to the student's last stage is what runs out of memory or makes that stage
              the pipeline's bottleneck). Needs the teacher's layers to fit the
              student's parallel.layer_split (even: divisible by pp * vpp) and its
              heads / FFN / vocabulary divisible by tp.
      "last"  whole (no pp, no TP) on each rank of the last stage, run per microbatch;
              under TP each rank keeps its own vocabulary (and sequence) rows. For any
              teacher shape; memory and time of the whole teacher on the last stage.
    With one stage and no TP both are the same thing: the whole teacher on every rank."""
    ce_weight: float = 1.0         # weight of the label cross-entropy
    kl_weight: float = 1.0         # weight of the T^2 KL to the teacher's logits
    hidden_weight: float = 1.0     # weight of the final-hidden-state loss
    hidden_loss: str = "mse"       # "sum_sq" (Eq. 10) | "mse"
    temperature: float = 1.0       # the paper's "smoothed logits", T = 1
    teacher_layout: str = "same"   # "same" | "last"

    def __post_init__(self):
        for name in ("ce_weight", "kl_weight", "hidden_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"distill.{name}={v!r} must be a number >= 0")
        if self.ce_weight + self.kl_weight + self.hidden_weight == 0:
            raise ValueError("distill: ce_weight, kl_weight and hidden_weight are all 0")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"distill.hidden_loss={self.hidden_loss!r} must be one of "
                             f"{', '.join(HIDDEN_LOSSES)}")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"distill.temperature={self.temperature!r} must be > 0")
        if self.teacher_layout not in TEACHER_LAYOUTS:
            raise ValueError(f"distill.teacher_layout={self.teacher_layout!r} must be one of "
                             f"{', '.join(TEACHER_LAYOUTS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_teacher(self) -> bool:
        return self.kl_weight > 0 or self.hidden_weight > 0

    def weight(self, term: str) -> float:
        return getattr(self, f"{term}_weight")


@dataclass(frozen=True)
class TPShards:
    """This rank's pieces of the last stage's outputs under tensor parallelism (tp > 1):
    logits hold vocabulary rows [rank * V/tp, (rank + 1) * V/tp) (VocabParallelHead's
    split); with sequence parallelism the final hidden state [s, b, h] holds sequence
    rows [rank * s/tp, (rank + 1) * s/tp), else all of them."""
    group: object
    rank: int
    size: int
    sequence_parallel: bool = False

    def vocab(self, t: torch.Tensor) -> torch.Tensor:
        """[..., V] -> this rank's [..., V/tp]."""
        return t.chunk(self.size, dim=-1)[self.rank]

    def sequence(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole sequence along `dim` -> this rank's rows (sequence parallelism)."""
        return t.chunk(self.size, dim=dim)[self.rank] if self.sequence_parallel else t


def make_projection(student_hidden: int, teacher_hidden: int,
                    kept_channels: list[int] | None = None) -> nn.Linear:
    """Student h -> teacher h, no bias. With the pruned student's kept teacher channels,
    start as that embedding (teacher channel kept[i] <- student channel i); otherwise a
    small random init."""
    proj = nn.Linear(student_hidden, teacher_hidden, bias=False)
    with torch.no_grad():
        if kept_channels is not None:
            if len(kept_channels) != student_hidden or max(kept_channels) >= teacher_hidden:
                raise ValueError(f"kept_channels ({len(kept_channels)}) do not map "
                                 f"{student_hidden} -> {teacher_hidden} channels")
            proj.weight.zero_()
            proj.weight[torch.tensor(kept_channels), torch.arange(student_hidden)] = 1.0
        else:
            nn.init.normal_(proj.weight, std=student_hidden ** -0.5)
    return proj


def head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final hidden state [s, b, h] -> fp32 logits [b, s, V]; for a VocabParallelHead this
    rank's vocabulary rows [b, s, V/tp] of the whole sequence. The head's own input
    mapping (sequence all-gather, or copy-to-region) makes the backward sum the ranks'
    partial gradients of the hidden state, as for its vocab-parallel CE."""
    return F.linear(mapped_input(head, hidden), head.weight).transpose(0, 1).float()


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelKL(torch.autograd.Function):
    """Per-token KL(softmax(t / T) || softmax(s / T)) [N] over a vocabulary split across
    `group` (None: all of it is here). Each rank subtracts the all-reduced row max and
    log-sum-exp from its shard, so it holds exact log-probabilities for its rows; the
    KL's per-rank partial sums are all-reduced, so every rank returns the same values.
    d KL / d s = (softmax(s / T) - softmax(t / T)) / T needs only this rank's rows: it
    is computed in forward and is the one [N, V/tp] buffer kept for backward (no
    communication there, like the vocab-parallel CE)."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, group):
        s = student.float() / temperature      # fresh fp32 tensors: worked on in place
        t = teacher.float() / temperature
        m = torch.stack([s.max(dim=-1).values, t.max(dim=-1).values])       # [2, N]
        _all_reduce(m, group, dist.ReduceOp.MAX)
        s.sub_(m[0].unsqueeze(-1))
        t.sub_(m[1].unsqueeze(-1))
        sum_exp = _all_reduce(torch.stack([s.exp().sum(dim=-1), t.exp().sum(dim=-1)]), group)
        s.sub_(sum_exp[0].log().unsqueeze(-1))     # log softmax(s / T), this rank's rows
        t.sub_(sum_exp[1].log().unsqueeze(-1))
        p = t.exp()
        kl = _all_reduce((p * (t - s)).sum(dim=-1), group)
        grad = s.exp_().sub_(p).div_(temperature)
        ctx.save_for_backward(grad)
        ctx.dtype = student.dtype
        return kl

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g.unsqueeze(-1)).to(ctx.dtype), None, None, None


def vocab_parallel_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      group=None) -> torch.Tensor:
    """student, teacher [N, V] logits (or this rank's [N, V/tp] rows, the same rows of
    both, with `group` the TP group) -> per-token KL(teacher || student) at temperature
    T [N] fp32, identical on every rank of the group; no gradient to the teacher."""
    return _VocabParallelKL.apply(student, teacher.detach(), float(temperature), group)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp: TPShards | None):
    flat, y = logits.float().flatten(0, 1), labels.flatten()
    if tp is None:
        return F.cross_entropy(flat, y, ignore_index=IGNORE, reduction="sum")
    return vocab_parallel_cross_entropy(flat, y, tp.group, tp.rank * flat.shape[-1],
                                        IGNORE).sum()


def _hidden_term(s_hidden, t_hidden, labels, cfg, proj, tp: TPShards | None):
    mask = labels != IGNORE
    if tp is not None:
        mask = tp.sequence(mask, dim=1)          # this rank's sequence rows, [b, s/tp]
    hs = s_hidden.transpose(0, 1)[mask].float()                      # [n, hs]
    ht = t_hidden.transpose(0, 1)[mask].float()                      # [n, ht]
    if proj is not None:
        hs = proj(hs)
    if hs.shape[-1] != ht.shape[-1]:
        raise ValueError(f"hidden distillation: student width {hs.shape[-1]} != teacher "
                         f"{ht.shape[-1]} and no projection given")
    sq = (ht - hs).pow(2)
    hid = 0.5 * sq.sum() if cfg.hidden_loss == "sum_sq" else sq.mean(-1).sum()
    if tp is not None and tp.sequence_parallel:
        # partial sums over this rank's rows -> the replicated total; backward identity:
        # each rank's rows receive the gradient of the one loss exactly once
        hid = reduce_from_region(hid, tp.group)
    return hid


def distill_loss(student_logits: torch.Tensor | None, student_hidden: torch.Tensor | None,
                 teacher_logits: torch.Tensor | None, teacher_hidden: torch.Tensor | None,
                 labels: torch.Tensor, cfg: DistillConfig, proj: nn.Module | None = None, *,
                 token_ce: torch.Tensor | None = None, tp: TPShards | None = None):
    """Summed per-token loss over label tokens, and its parts (summed, detached).

    student_logits, teacher_logits [b, s, V] (under `tp` this rank's [b, s, V/tp]);
    student_hidden [s, b, hs], teacher_hidden [s, b, ht] (the model's layouts; this rank's
    sequence rows under sequence parallelism); labels [b, s], always whole. token_ce: the
    student's per-token CE [b, s] when the caller has it (the model's own head loss);
    otherwise it comes from student_logits. Tensors may be None where their term's
    weight is 0."""
    parts = {}
    total = torch.zeros((), device=labels.device)
    if cfg.ce_weight > 0:
        ce = token_ce.float().sum() if token_ce is not None else _cross_entropy(
            student_logits, labels, tp)
        parts["ce"] = ce.detach()
        total = total + cfg.ce_weight * ce
    if cfg.kl_weight > 0:
        mask = labels != IGNORE
        t = cfg.temperature
        kl = vocab_parallel_kl(student_logits[mask], teacher_logits[mask], t,
                               tp.group if tp is not None else None).sum() * t * t
        parts["kl"] = kl.detach()
        total = total + cfg.kl_weight * kl
    if cfg.hidden_weight > 0:
        hid = _hidden_term(student_hidden, teacher_hidden, labels, cfg, proj, tp)
        parts["hidden"] = hid.detach()
        total = total + cfg.hidden_weight * hid
    return total, parts


def freeze(model: nn.Module) -> nn.Module:
    """The teacher: no gradients, eval mode (no dropout), never in an optimizer."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class WholeTeacher:
    """The teacher as one frozen GLM, run by the rank computing the loss on the batch's
    input_ids (teacher_layout "last", and any run with one stage and no TP). Under TP
    every rank of the last stage runs it whole and keeps its own rows of the outputs."""

    def __init__(self, model: nn.Module, tp: TPShards | None = None):
        self.model, self.tp = freeze(model), tp

    def outputs(self, batch: dict, side):
        """-> (logits [b, s, V(/tp)], final hidden [s(/tp), b, h]) for this rank."""
        hidden = self.model.hidden(batch["input_ids"].to(side.position_ids.device),
                                   position_ids=side.position_ids,
                                   block_position_ids=side.block_position_ids,
                                   prefix_lens=side.prefix_lens, doc_starts=side.doc_starts)
        logits = self.model.logits(hidden)
        if self.tp is not None:
            logits, hidden = self.tp.vocab(logits), self.tp.sequence(hidden, dim=0)
        return logits, hidden


class DistillLoss:
    """The objective for engine.train.trainer.Trainer, and a whole model's loss:

      (model, batch, device)                   one process, the whole student, one batch
      forward_step(chunk, batch, hidden, side) the Trainer's: non-last chunks run the plain
                                               GLM step; the last one computes the
                                               student's per-token CE (its own head loss,
                                               vocab-parallel under TP) and final hidden,
                                               the logits from that hidden when the KL
                                               needs them, and the loss with the
                                               teacher's outputs for the same batch

    teacher: a whole GLM (run here, see WholeTeacher), an object whose
    outputs(batch, side) gives this rank's (logits | None, final hidden) for the batch
    (engine.recipe.compress.distill_run.StagedTeacher), or None on ranks that never compute the
    loss. tp: this rank's TPShards (None without tensor parallelism).

    With a KL term the student's head runs once, for logits that feed both the CE and
    the KL (GLM.hidden gives the final hidden state; head_logits keeps this rank's
    vocabulary rows); without one the model's fused head loss gives the CE.

    Under no_grad (the trainer's evaluation) the value is the student's own summed
    cross-entropy, so dev losses compare across distillation weights and with runs that
    had no teacher. Running sums of each term feed `pop_stats` (per-token means)."""

    def __init__(self, teacher, cfg: DistillConfig, proj: nn.Module | None = None,
                 tp: TPShards | None = None):
        if isinstance(teacher, nn.Module):
            teacher = WholeTeacher(teacher, tp)
        self.teacher, self.cfg, self.proj, self.tp = teacher, cfg, proj, tp
        self._reset()

    def _reset(self):
        self._sums, self._tokens = dict.fromkeys(TERMS, 0.0), 0

    def __call__(self, model, batch: dict, device) -> torch.Tensor:
        from engine.pipeline.p2p import Side
        return self.forward_step(model, batch, None, Side.from_batch(batch, device))

    def forward_step(self, chunk, batch: dict, hidden_states, side):
        from engine.pipeline.stage import glm_forward_step
        if not chunk.post_process:
            return glm_forward_step(chunk, batch, hidden_states, side)
        device = side.position_ids.device
        kw = dict(position_ids=side.position_ids, block_position_ids=side.block_position_ids,
                  prefix_lens=side.prefix_lens, doc_starts=side.doc_starts)
        input_ids = batch["input_ids"].to(device) if chunk.pre_process else None
        labels = batch["labels"].to(device)
        if not torch.is_grad_enabled():
            return chunk(input_ids, hidden_states=hidden_states, labels=labels, **kw)
        if self.cfg.needs_teacher and self.teacher is None:
            raise ValueError("distill: kl_weight / hidden_weight > 0 need a teacher")
        s_hidden = chunk.hidden(input_ids, hidden_states=hidden_states, **kw)
        if self.cfg.kl_weight > 0:
            # the KL needs the logits anyway: one head pass feeds both CE and KL
            token_ce, s_logits = None, head_logits(chunk.output_layer, s_hidden)
        else:   # the model's fused head loss (vocab-parallel under TP), no logits formed
            token_ce, s_logits = chunk.head_loss(s_hidden, labels), None
        t_logits = t_hidden = None
        if self.cfg.needs_teacher:
            with torch.no_grad():
                t_logits, t_hidden = self.teacher.outputs(batch, side)
        total, parts = distill_loss(s_logits, s_hidden, t_logits, t_hidden, labels, self.cfg,
                                    self.proj, token_ce=token_ce, tp=self.tp)
        # kept as tensors: no host sync per microbatch; pop_stats reads them once per log line
        for k, v in parts.items():
            self._sums[k] = self._sums[k] + v
        self._tokens = self._tokens + (labels != IGNORE).sum()
        return total

    def pop_stats(self, state=None) -> dict:
        """Per-token means of the weighted-in terms since the last call. With a
        ParallelState it is a collective over the whole job, so every rank must call it
        at the same point (the Trainer's log hook does): the sums live on the last stage
        and are identical on its TP ranks, so TP rank 0 of each data-parallel replica
        contributes, and one all-reduce over the world adds the replicas and brings the
        result to every rank, rank 0 included, whatever its stage."""
        state = or_single(state, "cpu")
        device = state.device
        sums = torch.tensor([float(self._sums[k]) for k in TERMS] + [float(self._tokens)],
                            dtype=torch.float64, device=device)
        self._reset()
        if state.distributed:
            if state.coords.tp != 0:
                sums.zero_()
            dist.all_reduce(sums)
        values = sums.tolist()
        n = max(values[-1], 1.0)
        return {k: v / n for k, v in zip(TERMS, values) if self.cfg.weight(k) > 0}
