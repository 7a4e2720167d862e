"""Building one pipeline stage: its model chunks (initialised like the single-process
model) and the default forward step the executor calls on them."""
from __future__ import annotations

from engine.pipeline.p2p import Side


def build_stage(config, pp: int, vpp: int, stage: int, seed: int = 0, device="cpu",
                schedule: str | None = None, layer_split="even") -> list:
    """The vpp model chunks of one pipeline stage, initialised exactly like the same layers
    of the single-process model (init is per parameter name). layer_split: "even" or the
    layers of each virtual stage (parallel.layer_split; "balanced" resolved into counts
    by engine.train.layer_split.resolve_layer_split)."""
    from engine.pipeline.placement import placement_for
    from model import GLM
    place = placement_for(schedule, pp, vpp)   # zb-v: the V (engine.pipeline.placement)
    chunks = []
    for c in range(vpp):
        chunks.append(GLM.build(config, seed=seed, device=device,
                                layer_range=place.layers(config.num_layers, stage, c,
                                                         layer_split),
                                pre_process=place.first(stage, c),
                                post_process=place.last(stage, c)))
    return chunks


def glm_forward_step(chunk, batch: dict, hidden_states, side: Side):
    """Default forward step: input_ids on the first chunk, labels on the last (which then
    returns per-token losses [b, s]), hidden states [s, b, h] in between."""
    device = side.position_ids.device
    input_ids = batch["input_ids"].to(device) if chunk.pre_process else None
    labels = None
    if chunk.post_process and batch.get("labels") is not None:
        labels = batch["labels"].to(device)
    return chunk(input_ids, hidden_states=hidden_states, position_ids=side.position_ids,
                 block_position_ids=side.block_position_ids, prefix_lens=side.prefix_lens,
                 doc_starts=side.doc_starts, labels=labels)
