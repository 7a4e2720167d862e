"""Cross-entropy over a vocabulary split across tensor-parallel ranks, without ever
gathering the [tokens, vocab] logits.

Rank r holds logits for vocabulary rows [start, start + V/tp). Per token:
    m       = max over the full vocabulary        (all-reduce MAX of the local maxima)
    sum_exp = sum over the full vocabulary of exp(logit - m)   (all-reduce SUM)
    target  = logit[label] - m, contributed by the one rank that owns the label (SUM)
    loss    = log(sum_exp) - target
Subtracting the same m on every rank keeps exp in range and cancels out of the loss, so
m needs no gradient. The gradient w.r.t. the local logits is softmax - onehot, which
only needs the local softmax shard: that [tokens, V/tp] fp32 shard is the one big tensor
kept for backward (in place: forward turns the logits buffer into it, backward turns it
into the gradient).

`vocab_parallel_cross_entropy` takes logits; `vocab_parallel_linear_cross_entropy` also
does the output projection inside the same autograd node, so the projection's fp32
result is that buffer and nothing else of size [tokens, V/tp] is alive at once.
Losses are fp32 per token, 0 at ignored labels, and identical on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.ops import autocast_dtype


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int):
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.device.type != "cpu":
        # checked on the device: a host sync per microbatch would stall the GPU's queue
        torch._assert_async(~bad.any(), f"labels hold ids outside [0, {vocab}); "
                            f"ignore_index is {ignore_index}")
        return
    if bool(bad.any()):
        raise ValueError(f"labels hold ids outside [0, {vocab}) (e.g. "
                         f"{labels[bad][:3].tolist()}); ignore_index is {ignore_index}")


def _loss_and_softmax_(logits: torch.Tensor, labels: torch.Tensor, group, start: int,
                       ignore_index: int):
    """logits [N, Vl] fp32, owned by the caller and overwritten with the local softmax.
    Returns (loss [N], owned [N] bool, local label index [N], valid [N] bool)."""
    vl = logits.shape[-1]
    m = logits.max(dim=-1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    logits.sub_(m.unsqueeze(-1))
    valid = labels != ignore_index
    local = labels - start
    owned = valid & (local >= 0) & (local < vl)
    idx = local.clamp(0, vl - 1)
    target = logits.gather(1, idx.unsqueeze(1)).squeeze(1).masked_fill(~owned, 0.0)
    logits.exp_()
    # one all-reduce for both per-token sums: [2, N]
    stats = torch.stack([logits.sum(dim=-1), target])
    dist.all_reduce(stats, group=group)
    sum_exp, target = stats[0], stats[1]
    loss = (torch.log(sum_exp) - target).masked_fill(~valid, 0.0)
    logits.div_(sum_exp.unsqueeze(-1))  # now the local softmax shard
    return loss, owned, idx, valid


def _grad_logits_(ctx, g: torch.Tensor) -> torch.Tensor:
    """The saved softmax shard becomes d loss / d logits = (softmax - onehot) * g."""
    if ctx.consumed:
        raise RuntimeError("vocab-parallel cross-entropy reuses its saved softmax for the "
                           "gradient: backward can run only once (no retain_graph)")
    ctx.consumed = True
    softmax, owned, idx, valid = ctx.saved_tensors[-4:]
    softmax.scatter_add_(1, idx.unsqueeze(1), -owned.to(softmax.dtype).unsqueeze(1))
    softmax.mul_((g.float() * valid).unsqueeze(-1))  # ignored tokens get no gradient
    return softmax


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, start, ignore_index):
        work = logits.float()
        if work.data_ptr() == logits.data_ptr():
            work = work.clone()  # fp32 input: do not overwrite the caller's logits
        loss, owned, idx, valid = _loss_and_softmax_(work, labels, group, start, ignore_index)
        ctx.save_for_backward(work, owned, idx, valid)
        ctx.dtype, ctx.consumed = logits.dtype, False
        return loss

    @staticmethod
    def backward(ctx, g):
        return _grad_logits_(ctx, g).to(ctx.dtype), None, None, None, None


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, start, ignore_index):
        # hidden [N, h], weight [Vl, h] -> logits [N, Vl], fp32 for the softmax
        work = torch.matmul(hidden, weight.t()).float()
        loss, owned, idx, valid = _loss_and_softmax_(work, labels, group, start, ignore_index)
        ctx.save_for_backward(hidden, weight, work, owned, idx, valid)
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, g):
        hidden, weight = ctx.saved_tensors[:2]
        d_logits = _grad_logits_(ctx, g).to(weight.dtype)  # [N, Vl]
        # d_hidden is this shard's partial sum; the region entry's backward reduces it
        d_hidden = d_logits @ weight if ctx.needs_input_grad[0] else None
        d_weight = d_logits.t() @ hidden if ctx.needs_input_grad[1] else None
        return d_hidden, d_weight, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group,
                                 vocab_start: int, ignore_index: int = -100) -> torch.Tensor:
    """logits [N, V/tp] (this rank's vocabulary rows from vocab_start), labels [N] full
    vocabulary ids -> per-token loss [N] fp32."""
    _check_labels(labels, logits.shape[-1] * dist.get_world_size(group), ignore_index)
    return _VocabParallelCrossEntropy.apply(logits, labels, group, vocab_start, ignore_index)


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                        labels: torch.Tensor, group, vocab_start: int,
                                        ignore_index: int = -100) -> torch.Tensor:
    """hidden [N, h] (replicated), weight [V/tp, h] -> per-token loss [N] fp32. The
    gradient w.r.t. hidden is partial: enter `hidden` through copy_to_region (or the
    sequence all-gather) so that backward sums it over the ranks."""
    _check_labels(labels, weight.shape[0] * dist.get_world_size(group), ignore_index)
    dtype = autocast_dtype(hidden)
    if dtype is None:
        return _VocabParallelLinearCrossEntropy.apply(hidden, weight, labels, group,
                                                      vocab_start, ignore_index)
    # like F.linear under autocast, and with autocast off inside so that the backward's
    # matmuls (run outside autocast) take the forward's dtype rather than fp32
    with torch.autocast(hidden.device.type, enabled=False):
        return _VocabParallelLinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype),
                                                      labels, group, vocab_start,
                                                      ignore_index)
