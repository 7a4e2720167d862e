"""The two tensor-form collectives the data-parallel optimizer uses, by whichever name
this torch has: torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor to the
*_single forms (the old names warn); the GPU machine's torch 2.11 may have only the old
names. gloo and NCCL both implement them (even splits only: the layout pads each bucket
to a multiple of the dp size)."""
import torch.distributed as dist

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter(out, inp, group, async_op: bool = True):
    """Sum `inp` [world * n] over the group; rank r gets elements [r * n, (r + 1) * n)."""
    return _reduce_scatter(out, inp, group=group, async_op=async_op)


def all_gather(out, inp, group, async_op: bool = True):
    """out [world * n] = every rank's `inp` [n], in rank order."""
    return _all_gather(out, inp, group=group, async_op=async_op)
