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

"Last-layer hidden state" is the final-normed hidden state (GLM forward with
return_hidden=True) of both models. It is what the output head reads, so matching it
pulls the student's logits toward the teacher's; it has a fixed scale (unit RMS times
the norm weight) whereas the raw residual stream grows with depth and would differ
between a shallower or narrower student and its teacher; and it is what the last
pipeline stage holds anyway. When the widths differ a learned projection (student h ->
teacher h) maps the student's; for a pruned student it starts as the channel selection,
which is exact at step 0 when the pruned channels were zero.

`distill_loss` is a pure function of (student logits, student hidden, teacher logits,
teacher hidden, labels): a last pipeline stage can compute it from what it holds once
the teacher's outputs for the microbatch are there. `DistillLoss` is the single-process
`loss_fn` for engine.trainer.Trainer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
HIDDEN_LOSSES = ("sum_sq", "mse")


@dataclass
class DistillConfig:
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    hidden_weight: float = 1.0
    hidden_loss: str = "mse"       # "sum_sq" (Eq. 10) | "mse"
    temperature: float = 1.0       # the paper's "smoothed logits", T = 1

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

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_teacher(self) -> bool:
        return self.kl_weight > 0 or self.hidden_weight > 0


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


def distill_loss(student_logits: torch.Tensor, student_hidden: torch.Tensor,
                 teacher_logits: torch.Tensor | None, teacher_hidden: torch.Tensor | None,
                 labels: torch.Tensor, cfg: DistillConfig, proj: nn.Module | None = None):
    """Summed per-token loss over label tokens, and its parts (summed, detached).

    student_logits, teacher_logits [b, s, V]; student_hidden [s, b, hs], teacher_hidden
    [s, b, ht] (the model's layouts); labels [b, s]. Teacher tensors may be None when
    their weight is 0."""
    mask = labels != IGNORE                                          # [b, s]
    parts = {}
    total = student_logits.new_zeros(())
    if cfg.ce_weight > 0:
        ce = F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten(),
                             ignore_index=IGNORE, reduction="sum")
        parts["ce"] = ce.detach()
        total = total + cfg.ce_weight * ce
    if cfg.kl_weight > 0:
        t = cfg.temperature
        # fp32 softmax: the student's log-probs and the teacher's probs of rare tokens
        s_logp = F.log_softmax(student_logits[mask].float() / t, dim=-1)   # [n, V]
        t_logp = F.log_softmax(teacher_logits[mask].float() / t, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum() * t * t
        parts["kl"] = kl.detach()
        total = total + cfg.kl_weight * kl
    if cfg.hidden_weight > 0:
        hs = student_hidden.transpose(0, 1)[mask].float()            # [n, hs]
        ht = teacher_hidden.transpose(0, 1)[mask].float()            # [n, ht]
        if proj is not None:
            hs = proj(hs)
        if hs.shape[-1] != ht.shape[-1]:
            raise ValueError(f"hidden distillation: student width {hs.shape[-1]} != teacher "
                             f"{ht.shape[-1]} and no projection given")
        sq = (ht - hs).pow(2)
        hid = 0.5 * sq.sum() if cfg.hidden_loss == "sum_sq" else sq.mean(-1).sum()
        parts["hidden"] = hid.detach()
        total = total + cfg.hidden_weight * hid
    return total, parts


def freeze(model: nn.Module) -> nn.Module:
    """The teacher: no gradients, eval mode (no dropout), never in an optimizer."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class DistillLoss:
    """The objective for engine.trainer.Trainer, in both of its forms:

      loss_fn(model, batch, device)            one process, the whole student
      forward_step(chunk, batch, hidden, side) any pipeline layout: non-last chunks run the
                                               plain GLM step; the last one computes the
                                               student's logits + final hidden from its
                                               input and the loss from the teacher's
                                               outputs for the same batch

    The teacher is a whole, frozen GLM on the device that computes the loss (for a
    pipeline: on the ranks holding the last stage); it reads the batch's input_ids.
    Under no_grad (the trainer's evaluation) the value is the student's own summed
    cross-entropy, so dev losses compare across distillation weights and with runs that
    had no teacher. Running sums of each term feed `pop_stats` (per-token means)."""

    def __init__(self, teacher: nn.Module | None, cfg: DistillConfig,
                 proj: nn.Module | None = None):
        if cfg.needs_teacher and teacher is None:
            raise ValueError("distill: kl_weight / hidden_weight > 0 need a teacher")
        self.teacher = freeze(teacher) if teacher is not None else None
        self.cfg, self.proj = cfg, proj
        self._sums, self._tokens = {}, 0

    def __call__(self, model, batch: dict, device) -> torch.Tensor:
        from engine.p2p import Side
        return self.forward_step(model, batch, None, Side.from_batch(batch, device))

    def forward_step(self, chunk, batch: dict, hidden_states, side):
        from engine.schedules import glm_forward_step
        if not chunk.post_process:
            return glm_forward_step(chunk, batch, hidden_states, side)
        device = side.position_ids.device
        kw = dict(position_ids=side.position_ids, block_position_ids=side.block_position_ids,
                  prefix_lens=side.prefix_lens)
        input_ids = batch["input_ids"].to(device) if chunk.pre_process else None
        labels = batch["labels"].to(device)
        if not torch.is_grad_enabled():
            return chunk(input_ids, hidden_states=hidden_states, labels=labels, **kw)
        s_logits, s_hidden = chunk(input_ids, hidden_states=hidden_states, return_hidden=True,
                                   **kw)
        t_logits = t_hidden = None
        if self.cfg.needs_teacher:
            with torch.no_grad():
                self.teacher.eval()
                t_logits, t_hidden = self.teacher(batch["input_ids"].to(device),
                                                  return_hidden=True, **kw)
        total, parts = distill_loss(s_logits, s_hidden, t_logits, t_hidden, labels, self.cfg,
                                    self.proj)
        for k, v in parts.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._tokens += int((labels != IGNORE).sum())
        return total

    def pop_stats(self) -> dict:
        n = max(self._tokens, 1)
        out = {k: v / n for k, v in self._sums.items()}
        self._sums, self._tokens = {}, 0
        return out
