"""What the single-device GLM expects of the layers a parallelizer swaps in.

model/ never imports engine/; engine/tensor_parallel/parallelize.py replaces parts of a
built GLM in place. These are the only places where the two meet, and the model relies on
nothing else (no weight shapes, no attribute probing):

  SelfAttention.qkv, .dense   swapped with `SelfAttention.use_projections(qkv, dense,
                              num_heads, num_groups)`: any modules [s', b, h] ->
                              [s, b, (heads + 2 groups) * d] and [s, b, heads * d] ->
                              [s', b, h] (s' = s / tp under sequence parallelism). The
                              local head counts are passed, never read off weights.
  MLP.gate_up, MLP.down       any modules [..., h] -> [..., 2 f'] ([gate | up] halves)
                              and [..., f'] -> [..., h]. Without a bias the MLP fuses
                              gate_up with SwiGLU and multiplies `gate_up.weight` itself,
                              so a gate_up whose weight does not multiply x directly is a
                              `MapsInput`.
  GLM.embedding               ids [b, s] -> [b, s', h].
  GLM.output_layer            `forward(h [s, b, h]) -> logits [s, b, V]`; a `LossHead`
                              computes the per-token loss itself (vocab-parallel, no
                              whole logits), otherwise the model's fused linear + CE
                              multiplies `output_layer.weight`.
  dropout                     `GLM.set_dropout_rng(factory)` when the residual stream is
                              sharded (sequence parallelism): each rank draws its own
                              masks from `factory()`, a context manager.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class MapsInput(Protocol):
    """A projection whose weight multiplies `input_map(x)`, not x: forward is
    F.linear(input_map(x), weight, ...) (then, for a head, a gather). A fused kernel that
    is handed `weight` calls input_map first: a tensor-parallel layer's identity with a
    reducing backward, or the sequence all-gather."""
    weight: torch.Tensor

    def input_map(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class LossHead(Protocol):
    """An output layer that brings its own loss (a vocabulary-sharded head)."""
    weight: torch.Tensor

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden [N, h] sequence-major, labels [N] -> per-token loss [N] fp32, 0 where
        the label is -100."""
        ...


def mapped_input(layer, x: torch.Tensor) -> torch.Tensor:
    """The tensor `layer.weight` multiplies: x itself unless the layer maps it first."""
    return layer.input_map(x) if isinstance(layer, MapsInput) else x
