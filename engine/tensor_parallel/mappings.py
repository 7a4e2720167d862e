"""The collectives autograd sees in tensor parallelism: each a small named
autograd.Function whose backward is its forward's adjoint, with a snake_case wrapper.

    copy_to_region        fwd identity              bwd all-reduce
    reduce_from_region    fwd all-reduce            bwd identity
    scatter_last_dim      fwd keep own chunk        bwd all-gather (last dim)
    gather_last_dim       fwd all-gather (last dim) bwd keep own chunk
    scatter_to_sequence   fwd keep own chunk        bwd all-gather (dim 0)
    all_gather_sequence   fwd all-gather (dim 0)    bwd reduce-scatter (dim 0)
    reduce_scatter_sequence fwd reduce-scatter (dim 0) bwd all-gather (dim 0)
    copy_to_replicas      fwd identity              bwd sum over the ranks sharing a replica

Sequence-parallel tensors are [s, b, h] split along s (dim 0): rank r holds rows
[r * s / tp, (r + 1) * s / tp). `all_gather_sequence` feeds a tensor-parallel computation
(a column-parallel layer), whose input gradients are partial sums on every rank, hence
the reduce-scatter in its backward. `gather_last_dim` feeds a replicated computation
(full logits), whose gradient every rank already holds in full, hence the plain chunk.

Every collective copies its input first: autograd may hand the same gradient tensor to
several consumers (an addition passes it through unchanged), so reducing in place could
corrupt a sibling's gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


# ---- raw collectives (no autograd) -----------------------------------------------------

def _is_gloo(group) -> bool:
    return dist.get_backend(group) == "gloo"


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split_dim0(x: torch.Tensor, group) -> torch.Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[0] % world:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by the tensor-parallel "
                         f"size {world} (sequence parallelism splits dim 0 evenly)")
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n].contiguous()


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[-1] % world:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by the tensor-parallel "
                         f"size {world}")
    return x.chunk(world, dim=-1)[rank].contiguous()


def _gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    if _is_gloo(group):
        # chunks of a contiguous buffer along dim 0 are contiguous: gathered in place
        dist.all_gather(list(out.chunk(world)), x, group=group)
    else:
        dist.all_gather_into_tensor(out, x, group=group)
    return out


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    pieces = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces, dim=-1)


def reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group, keep this rank's dim-0 chunk. gloo builds without
    reduce_scatter exist (and gloo's, where present, is no faster than this), so on gloo
    it is an all-reduce and a slice: twice the traffic, same result on every backend."""
    world = dist.get_world_size(group)
    if x.shape[0] % world:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by the tensor-parallel "
                         f"size {world} (sequence parallelism splits dim 0 evenly)")
    if _is_gloo(group):
        return _split_dim0(_all_reduce(x, group), group)
    x = x.contiguous()
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


# ---- autograd pairs --------------------------------------------------------------------

class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_last(g, ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_dim0(g, ctx.group), None


class _AllGatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter_dim0(g, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_dim0(g, ctx.group), None


class _CopyToReplicas(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks of `group` that hold
    the same replica (`slot` of `slots`). One all-reduce of a [slots, ...] buffer that is
    zero outside each rank's own slot: no sub-group is needed (new_group would be a
    collective over the whole world, awkward inside a tp x pp x dp layout), and the
    extra traffic is only `slots` times the replica's size."""

    @staticmethod
    def forward(ctx, x, group, slot, slots):
        ctx.group, ctx.slot, ctx.slots = group, slot, slots
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        buf = g.new_zeros((ctx.slots, *g.shape))
        buf[ctx.slot] = g
        dist.all_reduce(buf, group=ctx.group)
        return buf[ctx.slot], None, None, None


def copy_to_region(x, group):
    """Enter a tensor-parallel region with a replicated tensor."""
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x, group):
    """Leave a tensor-parallel region: sum the ranks' partial results."""
    return _ReduceFromRegion.apply(x, group)


def scatter_last_dim(x, group):
    return _ScatterLastDim.apply(x, group)


def gather_last_dim(x, group):
    """Concatenate the ranks' last-dim shards; the result feeds replicated computation."""
    return _GatherLastDim.apply(x, group)


def scatter_to_sequence(x, group):
    """[s, b, h] replicated -> this rank's [s/tp, b, h]."""
    return _ScatterToSequence.apply(x, group)


def all_gather_sequence(x, group):
    """[s/tp, b, h] -> [s, b, h], feeding a tensor-parallel (partial-gradient) computation."""
    return _AllGatherSequence.apply(x, group)


def reduce_scatter_sequence(x, group):
    """[s, b, h] partial sums -> this rank's [s/tp, b, h] of the total."""
    return _ReduceScatterSequence.apply(x, group)


def copy_to_replicas(x, group, slot: int, slots: int):
    """A tensor replicated on the ranks that pass the same `slot` (0 <= slot < slots):
    its gradient becomes the sum over those ranks."""
    return _CopyToReplicas.apply(x, group, slot, slots)


def all_reduce_grad_hook(group):
    """A leaf-parameter hook summing the parameter's gradient over `group` before it is
    accumulated: for replicated parameters that see only this rank's sequence shard
    (norm weights and row-parallel biases under sequence parallelism)."""
    def hook(g):
        return _all_reduce(g, group)
    return hook
