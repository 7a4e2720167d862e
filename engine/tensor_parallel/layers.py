"""Megatron's tensor-parallel layers, built only from the autograd pairs in mappings.py.

Shapes are local: a layer holds this rank's shard and knows nothing about which rows of
the full weight those are (parallelize.py's shard plan decides; see there). Inputs and
outputs are [s, b, h] (or any [..., h]); with sequence parallelism the replicated side
of a layer is [s/tp, b, h].

    ColumnParallelLinear  y_r = x W_r^T + b_r          in: replicated      out: sharded
    RowParallelLinear     y = sum_r x_r W_r^T (+ b)    in: sharded         out: replicated
    VocabParallelEmbedding   rows of the table split by vocabulary range
    VocabParallelHead        output projection split by vocabulary; full logits or a
                             vocab-parallel loss

The column and row layers do their local product through `self._matmul(x, weight, bias)`
(F.linear by default): a zero-bubble schedule's split backward replaces it on the
instance with a product whose weight gradient waits for the W pass. The product is local
(the communication sits in input_map / the reduction around it), so dW = dY^T X needs no
collective and can run whenever W does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.tensor_parallel.cross_entropy import vocab_parallel_linear_cross_entropy
from engine.tensor_parallel.mappings import (all_gather_sequence, copy_to_region,
                                             copy_to_replicas, gather_last_dim,
                                             reduce_from_region, reduce_scatter_sequence)
from kernels.ops import at_labelled


def _param(*shape, device=None, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))


class ColumnParallelLinear(nn.Module):
    """Output features split across ranks; this rank computes its [..., out_local] slice.

    replica: (first_row, slot, slots) when weight rows [first_row, out_local) are a copy
    that other ranks hold too (GQA KV groups when tp exceeds the groups): the ranks that
    pass the same slot hold the same rows and their gradients are summed over them."""

    # the local product (see the module docstring); an instance attribute may replace it.
    # A layer with `replica` keeps F.linear: what it multiplies is a cat through
    # copy_to_replicas, not its weight, and that weight's gradient needs the cat's
    # backward, an all-reduce over the sharers (engine/pipeline/split_backward.py)
    _matmul = staticmethod(F.linear)

    def __init__(self, in_features: int, out_features: int, bias: bool, group,
                 sequence_parallel: bool = False, replica: tuple[int, int, int] | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group, self.sequence_parallel, self.replica = group, sequence_parallel, replica
        self.weight = _param(out_features, in_features, device=device, dtype=dtype)
        self.bias = _param(out_features, device=device, dtype=dtype) if bias else None

    def input_map(self, x):
        """Replicated input -> this layer's region (model/parallel_protocol.py, MapsInput): the full sequence under sequence
        parallelism ([s/tp, b, h] -> [s, b, h]), else an identity whose backward sums the
        ranks' partial input gradients."""
        if self.sequence_parallel:
            return all_gather_sequence(x, self.group)
        return copy_to_region(x, self.group)

    def _shared(self, t):
        if t is None or self.replica is None:
            return t
        first, slot, slots = self.replica
        return torch.cat([t[:first], copy_to_replicas(t[first:], self.group, slot, slots)])

    def forward(self, x):
        return self._matmul(self.input_map(x), self._shared(self.weight),
                            self._shared(self.bias))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features} (local), "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}, "
                f"replica={self.replica}")


class RowParallelLinear(nn.Module):
    """Input features split across ranks: each rank multiplies its [..., in_local] slice
    and the partial products are summed (all-reduce, or reduce-scatter along the sequence
    under sequence parallelism). The bias is replicated and added once, after the sum."""

    _matmul = staticmethod(F.linear)   # the local product (see the module docstring)

    def __init__(self, in_features: int, out_features: int, bias: bool, group,
                 sequence_parallel: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _param(out_features, in_features, device=device, dtype=dtype)
        self.bias = _param(out_features, device=device, dtype=dtype) if bias else None

    def forward(self, x):
        y = self._matmul(x, self.weight, None)
        if self.sequence_parallel:
            y = reduce_scatter_sequence(y, self.group)  # [s, b, h] -> [s/tp, b, h]
        else:
            y = reduce_from_region(y, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self):
        return (f"in_features={self.in_features} (local), out_features={self.out_features}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


def _vocab_range(vocab: int, group) -> tuple[int, int]:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if vocab % world:
        raise ValueError(f"padded_vocab_size={vocab} is not divisible by tp={world}")
    per = vocab // world
    return rank * per, (rank + 1) * per


class VocabParallelEmbedding(nn.Module):
    """Table rows [start, end) of the vocabulary on this rank. Ids [b, s] -> [b, s, h]
    replicated, or under sequence parallelism [b, s/tp, h] (the caller's transpose to
    [s, b, h] then yields this rank's sequence shard)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group,
                 sequence_parallel: bool = False, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group, self.sequence_parallel = group, sequence_parallel
        self.vocab_start, self.vocab_end = _vocab_range(num_embeddings, group)
        self.weight = _param(self.vocab_end - self.vocab_start, embedding_dim,
                             device=device, dtype=dtype)

    def forward(self, input_ids):
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(outside, 0)
        # other ranks' ids look up row 0 here and are zeroed: exactly one rank is nonzero
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            # [b, s, h] -> [s, b, h] partial -> [s/tp, b, h] summed -> [b, s/tp, h] view
            return reduce_scatter_sequence(out.transpose(0, 1), self.group).transpose(0, 1)
        return reduce_from_region(out, self.group)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"rows=[{self.vocab_start}, {self.vocab_end}), "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelHead(nn.Module):
    """The untied output projection split by vocabulary rows. forward gives full-vocab
    logits (gathered: generation needs them); loss never forms them."""

    def __init__(self, hidden_size: int, vocab_size: int, group,
                 sequence_parallel: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = hidden_size, vocab_size
        self.group, self.sequence_parallel = group, sequence_parallel
        self.vocab_start, self.vocab_end = _vocab_range(vocab_size, group)
        self.weight = _param(self.vocab_end - self.vocab_start, hidden_size,
                             device=device, dtype=dtype)

    def input_map(self, x):
        """The input the weight multiplies (model/parallel_protocol.py, MapsInput).
        Sequence-major rows: gathering dim 0 of a flat [s/tp * b, h] or of [s/tp, b, h]
        both restore the full sequence in order."""
        if self.sequence_parallel:
            return all_gather_sequence(x, self.group)
        return copy_to_region(x, self.group)

    def forward(self, h):
        """h [s, b, h] (or [s/tp, b, h]) -> logits [s, b, V] on every rank."""
        return gather_last_dim(F.linear(self.input_map(h), self.weight), self.group)

    def loss(self, hidden, labels, ignore_index: int = -100):
        """hidden [N, h] sequence-major (N = s*b, or s/tp * b under sequence parallelism),
        labels [N_full] -> per-token loss [N_full] fp32, 0 at ignore_index. The head runs
        only at labelled rows, selected after the sequence gather (labels are replicated,
        so every rank keeps the same rows and the collectives inside agree on shapes)."""
        def fn(h, y):
            return vocab_parallel_linear_cross_entropy(h, self.weight, y, self.group,
                                                       self.vocab_start, ignore_index)
        return at_labelled(fn, self.input_map(hidden), labels, ignore_index)

    def extra_repr(self):
        return (f"in_features={self.in_features}, vocab={self.out_features}, "
                f"rows=[{self.vocab_start}, {self.vocab_end}), "
                f"sequence_parallel={self.sequence_parallel}")
