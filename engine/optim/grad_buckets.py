"""Gradient buckets: accumulate microbatch gradients into flat buffers and reduce them
over data parallel while backward is still running.

Each parameter's post-accumulate-grad hook adds `p.grad` into its bucket and frees it.
On the last microbatch (outside `no_sync`), a bucket whose every parameter has reported
starts its reduction at once as async work; buckets start strictly in index order so
every rank issues the same collectives in the same order. `finish()` (called by the
optimizer step) starts whatever is left and waits.

The reduction is a SUM: each microbatch's loss is already divided by the global number
of label tokens, so the sum over ranks is the gradient of the global-batch loss.

    ZeRO 0/1: all_reduce each bucket; every rank keeps full gradients.
    ZeRO 2  : one reduce_scatter_tensor per bucket (every rank owns an equal slice of
              each bucket), straight into this rank's gradient shard (reduce dtype); the
              bucket buffers are freed.

A producer that computes a weight gradient itself may skip .grad and the hook's extra pass:
`grad_sink(p)` is its GradSink (its bucket slot, and the call that reports it
accumulated), held in a weak registry rather than on the parameter, so that a copy of the
model does not copy the buckets. The W op of a split backward (engine/pipeline/split_backward.py)
adds its dW = dY^T X GEMM straight into the slot that way, as Megatron's gradient-
accumulation fusion adds into main_grad.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from engine.optim import collectives
from engine.optim.layout import FlatLayout


class GradBuckets:
    def __init__(self, params: list[torch.nn.Parameter], layout: FlatLayout, dtype, group,
                 shard_rank: int, world: int, scatter: bool):
        """shard_rank: which of the layout's shards this rank updates (0 under ZeRO 0,
        where the one shard is everything); world: the dp group's size."""
        self.layout, self.dtype, self.group = layout, dtype, group
        self.shard_rank, self.world, self.scatter = shard_rank, world, scatter
        self.device = params[0].device
        nb = len(layout.buckets)
        self.buffers: list[torch.Tensor | None] = [None] * nb
        self.grad_shard: torch.Tensor | None = None   # ZeRO 2 only: [shard_size]
        self.sync_enabled = True
        self._ready: list[set[int]] = [set() for _ in range(nb)]
        self._launched = [False] * nb
        self._works: list[list] = [[] for _ in range(nb)]
        self._next = 0              # buckets [0, _next) have been launched
        self._finished = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i))
                         for i, p in enumerate(params)]
        self._params = params
        for i, p in enumerate(params):
            _SINKS[p] = GradSink(self, i)

    # ---- backward side -----------------------------------------------------------------
    def _hook(self, i: int):
        def on_grad(p: torch.Tensor):
            if p.grad is None:
                return
            with torch.no_grad():
                self.slot_view(i).add_(p.grad)
            p.grad = None  # the bucket holds it now; do not keep two copies
            self.accumulated(i)
        return on_grad

    def slot_view(self, i: int) -> torch.Tensor:
        """Parameter i's slot in its bucket (shaped like it, in the reduce dtype): where
        its gradient accumulates. Raises if that bucket's reduction has started."""
        slot = self.layout.slots[i]
        b = slot.bucket
        if self._launched[b] or self._finished:
            raise RuntimeError(
                f"gradient of {slot.name} arrived after its bucket was reduced: run "
                "every microbatch but the last under no_sync(), and step() or "
                "zero_grad() before the next backward")
        lo = slot.offset - self.layout.buckets[b].start
        return self._buffer(b)[lo:lo + slot.numel].view(slot.shape)

    def accumulated(self, i: int):
        """Parameter i's gradient of this microbatch is in its slot: on the last
        microbatch (sync enabled) its bucket may start reducing."""
        if self.sync_enabled:
            self._ready[self.layout.slots[i].bucket].add(i)
            self._launch_ready()

    def _buffer(self, b: int) -> torch.Tensor:
        if self.buffers[b] is None:
            self.buffers[b] = torch.zeros(self.layout.buckets[b].size, dtype=self.dtype,
                                          device=self.device)
        return self.buffers[b]

    def _launch_ready(self):
        buckets = self.layout.buckets
        while (self._next < len(buckets)
               and len(self._ready[self._next]) == len(buckets[self._next].slots)):
            self._launch(self._next)

    def _launch(self, b: int):
        buf = self._buffer(b)
        self._launched[b] = True
        self._next = b + 1
        if self.world == 1:
            return
        if self.scatter:
            if self.grad_shard is None:
                self.grad_shard = torch.empty(self.layout.shard_size, dtype=self.dtype,
                                              device=self.device)
            _, _, _, slo, shi = self.layout.shard_pieces(self.shard_rank)[b]
            self._works[b] = [collectives.reduce_scatter(self.grad_shard[slo:shi], buf,
                                                         self.group)]
        else:
            self._works[b] = [dist.all_reduce(buf, group=self.group, async_op=True)]

    @property
    def num_launched(self) -> int:
        return self._next

    # ---- optimizer side ----------------------------------------------------------------
    def finish(self):
        """Start the reductions no hook started (parameters without a gradient in the last
        microbatch, or a step without backward), in index order, and wait for all."""
        if self._finished:
            return
        for b in range(self._next, len(self.layout.buckets)):
            self._launch(b)
        if self.scatter and self.world == 1:   # no collective: the bucket is the shard
            self.grad_shard = torch.cat([self._buffer(b) for b in range(len(self.buffers))])
        for b, works in enumerate(self._works):
            for w in works:
                w.wait()
            self._works[b] = []
            if self.scatter:
                self.buffers[b] = None  # this rank keeps only its shard
        self._finished = True

    def shard_grads(self) -> list[tuple[torch.Tensor, int, int]]:
        """(grad, slo, shi): this rank's reduced gradient shard as pieces, shard-local
        [slo, shi). Views into the buffers: the caller may scale them in place."""
        assert self._finished, "finish() first"
        if self.scatter:   # per bucket slice, as the fp32 alias master is cut
            return [(self.grad_shard[slo:shi], slo, shi)
                    for _, _, _, slo, shi in self.layout.shard_pieces(self.shard_rank)]
        return [(self.buffers[b][blo:bhi], slo, shi)
                for b, blo, bhi, slo, shi in self.layout.shard_pieces(self.shard_rank)]

    def full_flat(self) -> torch.Tensor:
        """All reduced gradients as one fp32 [total] tensor (collective under ZeRO 2)."""
        self.finish()
        if not self.scatter:
            return torch.cat([self._buffer(b).float() for b in range(len(self.buffers))])
        if self.world == 1:
            return self.grad_shard.float()
        out = torch.empty(self.layout.total, dtype=self.dtype, device=self.device)
        works = [collectives.all_gather(out[self.layout.buckets[b].start:
                                            self.layout.buckets[b].end],
                                        self.grad_shard[slo:shi], self.group)
                 for b, _, _, slo, shi in self.layout.shard_pieces(self.shard_rank)]
        for w in works:
            w.wait()
        return out.float()

    def reset(self):
        """Zero the gradients for the next step; waits for any reduction in flight."""
        for works in self._works:
            for w in works:
                w.wait()
        for b, buf in enumerate(self.buffers):
            if self.scatter:
                self.buffers[b] = None
            elif buf is not None:
                buf.zero_()
        self.grad_shard = None
        self._ready = [set() for _ in self._ready]
        self._launched = [False] * len(self._launched)
        self._works = [[] for _ in self._works]
        self._next = 0
        self._finished = False

    def bytes_held(self) -> int:
        """Gradient bytes held at step time: the shard (ZeRO 2) or all buckets."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return itemsize * (self.layout.shard_size if self.scatter else self.layout.total)

    def remove_hooks(self):
        for h in self._handles:
            h.remove()
        for p in self._params:
            if p in _SINKS and _SINKS[p].buckets is self:
                del _SINKS[p]


class GradSink:
    """One parameter's bucket slot, for a producer that accumulates its gradient there
    itself instead of through .grad and the post-accumulate-grad hook (module docstring).
    view() then accumulated(), once per microbatch, as the hook would run."""
    __slots__ = ("buckets", "index")

    def __init__(self, buckets: GradBuckets, index: int):
        self.buckets, self.index = buckets, index

    def view(self) -> torch.Tensor:
        return self.buckets.slot_view(self.index)

    def accumulated(self):
        self.buckets.accumulated(self.index)


_SINKS = WeakIdKeyDictionary()   # parameter -> GradSink (by identity, as tensors hash)


def grad_sink(p: torch.Tensor) -> GradSink | None:
    """The bucket slot p's gradient accumulates in, if a GradBuckets holds p."""
    return _SINKS.get(p)
