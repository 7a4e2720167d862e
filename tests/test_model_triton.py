"""The tiny GLM on Triton kernels (interpreted) against the same GLM on the torch
references: same weights, same prefix-LM batch -> same losses and gradients (fp32)."""
import torch

from model import GLM, GLMConfig
from model import masks
from tolerance import within

TOL = 2e-5  # relative to max(1, |reference|): fp32 with reordered sums


def pair():
    models = [GLM.build(GLMConfig.preset("tiny", kernels=k), seed=0) for k in ("triton", "torch")]
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
    return models


def glm_batch(seq_len=24):
    g = torch.Generator().manual_seed(3)
    text = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (14, 17)]
    ex = [masks.corrupt_spans(text[0], mask_id=5, sop_id=6, eop_id=7, generator=g, ratio=0.3),
          masks.gmask_example(text[1], 9, gmask_id=4, sop_id=6, eop_id=7)]
    return masks.collate(ex, seq_len=seq_len, pad_id=0)


def test_tiny_glm_loss_and_gradients_match_torch():
    tri, ref = pair()
    batch = glm_batch()
    assert (batch["prefix_lens"] > 0).all() and (batch["block_position_ids"] > 0).any()
    kw = {k: batch[k] for k in ("position_ids", "block_position_ids", "prefix_lens", "labels")}
    losses = [m(batch["input_ids"], **kw) for m in (tri, ref)]
    count = (batch["labels"] != -100).sum()
    within(losses[0], losses[1], TOL, "per-token loss")
    assert torch.all(losses[0][batch["labels"] == -100] == 0)
    for m, loss in zip((tri, ref), losses):
        (loss.sum() / count).backward()
    for (name, p), q in zip(tri.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.abs().max() > 0, name
        within(p.grad, q.grad, TOL, name)


def test_tiny_glm_logits_and_kv_cache_decode_match_torch():
    tri, ref = pair()
    ids = torch.randint(10, 1000, (2, 9))
    prefix = torch.tensor([5, 9])
    with torch.no_grad():
        within(tri(ids, prefix_lens=prefix), ref(ids, prefix_lens=prefix), TOL, "logits")
        # prefill 8 tokens into a cache, then decode one step at q_offset 8
        outs = []
        for m in (tri, ref):
            cache = m.new_kv_cache(batch=2, max_len=16)
            m(ids[:, :8], prefix_lens=prefix.clamp(max=8), kv_cache=cache)
            outs.append(m(ids[:, 8:], prefix_lens=prefix, kv_cache=cache))
        within(outs[0], outs[1], TOL, "decode logits")
