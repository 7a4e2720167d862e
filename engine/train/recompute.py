"""Full activation recomputation: `train.recompute` (Megatron's `--recompute-granularity
full`, one layer per checkpoint).

Each GLMBlock keeps only its input tensors for backward and runs its forward again in
backward to rebuild the activations it needs: saved activations drop from every layer's
full set to every layer's input plus one layer's full set at a time, for one more forward
of the layers (~1/3 more layer compute). Only training forwards are checkpointed (grad
enabled, no KV cache); evaluation and decoding run the plain forward.

    recompute_layers(chunk)   # in place, after parallelize; the Trainer does it for
                              # every chunk when cfg.train.recompute

Dropout must draw the same masks when the forward is replayed. torch.utils.checkpoint
restores the default generator (replicated dropout) but not the tensor-parallel tracker
(`model.tp_rng`, engine/tensor_parallel/random.py: dropout on sharded tensors, e.g. the
residual stream under sequence parallelism). So each checkpointed call snapshots the
tracker's states at forward entry and the replay runs from that snapshot; afterwards the
tracker is put back where it was before the replay, so the streams continue as if the
forward had run once.

Reentrant checkpointing: the replay runs through the caller's saved-tensor hooks, so
engine.pipeline.stats.SavedActivationMeter (and the planner's measurement) see the
recompute peak; non-reentrant checkpointing would hide those tensors behind its own hooks.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from model.glm import GLM, GLMBlock


def _snapshot(tracker) -> dict | None:
    # a shallow copy suffices: fork() replaces a state tensor, it never writes into one
    return dict(tracker.states) if tracker is not None else None


class _Replayable:
    """A block's forward for one checkpointed call. The first call is the forward itself;
    a later call (the replay in backward) runs with the tracker's states as they were at
    the first call, then restores the tracker's states from before the replay (other
    microbatches' forwards may have moved them since)."""

    def __init__(self, fn, tracker):
        self.fn, self.tracker, self.ran = fn, tracker, False
        self.entry = _snapshot(tracker)

    def __call__(self, *args):
        if not self.ran or self.entry is None:
            self.ran = True
            return self.fn(*args)
        current = self.tracker.states
        self.tracker.states = dict(self.entry)
        try:
            return self.fn(*args)
        finally:
            self.tracker.states = current


def recompute_layers(model: GLM) -> GLM:
    """Checkpoint every GLMBlock of `model` (a whole GLM or a pipeline chunk), in place;
    parameter names are unchanged (the blocks' forward is wrapped). Idempotent. The
    tensor-parallel tracker is looked up on `model` at each call, so this may run before
    or after parallelize."""
    for block in model.layers.values():
        if not isinstance(block, GLMBlock):
            raise ValueError(f"recompute_layers: expected GLMBlock, got {type(block).__name__}")
        if getattr(block, "recompute", False):
            continue
        inner = block.forward

        def forward(x, cos, sin, prefix_lens=None, pad_lens=None, kv_cache=None,
                    doc_starts=None, _inner=inner):
            # x.requires_grad: reentrant checkpointing returns no parameter gradients when
            # no input needs one (a frozen embedding's output): run it plainly then
            if kv_cache is not None or not torch.is_grad_enabled() or not x.requires_grad:
                return _inner(x, cos, sin, prefix_lens, pad_lens, kv_cache, doc_starts)
            fn = _Replayable(_inner, getattr(model, "tp_rng", None))
            return checkpoint(fn, x, cos, sin, prefix_lens, pad_lens, None, doc_starts,
                              use_reentrant=True)
        block.forward = forward
        block.recompute = True
    return model
