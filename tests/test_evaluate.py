"""engine/recipe/evaluate.py: the teacher-forced losses behind the dev and held-out columns."""
import torch

from engine.recipe.data.datasets import TranslationDataset
from engine.recipe.evaluate import full_loss
from model import GLM, GLMConfig
from model.masks import collate
from model.tokenizer import SpecialIds

IDS = SpecialIds()


def _dataset(n):
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(16, 256, (int(a),), generator=g).tolist(),
              torch.randint(16, 256, (int(b),), generator=g).tolist())
             for a, b in torch.randint(2, 9, (n, 2), generator=g)]
    return TranslationDataset(pairs, IDS, 24, shuffle=False)


def test_full_loss_counts_every_example_once_whatever_the_batch():
    torch.manual_seed(0)
    model = GLM.build(GLMConfig.preset("tiny", padded_vocab_size=256)).eval()
    ds = _dataset(7)
    # reference: one example at a time, summed losses over summed target tokens
    total, count = 0.0, 0
    with torch.no_grad():
        for j in range(len(ds)):
            b = collate([ds.example(j)], ds.seq_len, ds.ids.pad)
            losses = model(b["input_ids"], position_ids=b["position_ids"],
                           block_position_ids=b["block_position_ids"],
                           prefix_lens=b["prefix_lens"], labels=b["labels"])
            total += float(losses.sum())
            count += int((b["labels"] != -100).sum())
    want = total / count
    # 7 examples: batches of 3 leave a partial last batch; 32 is one batch of all of them
    for bs in (1, 3, 32):
        assert abs(full_loss(model, ds, bs) - want) < 1e-5 * want
    # a different set of examples gives a different loss (the check can fail)
    assert abs(full_loss(model, _dataset(5), 3) - want) > 1e-4
