"""Packed rows (several examples per row, document masking): the mask, the Triton kernel
against the reference, and the model's loss and gradients against the same examples
one per row."""
import numpy as np
import pytest
import torch

from engine.pipeline.p2p import Side
from engine.recipe.data.datasets import TranslationDataset
from engine.recipe.data.packing import best_fit_rows
from kernels import flash_attention as fa
from kernels import reference as ref
from model.config import GLMConfig
from model.glm import GLM
from model.masks import IGNORE, blank_infilling_example, collate, pack
from model.tokenizer import SpecialIds

_S = SpecialIds()
SOP, EOP, GMASK, PAD = _S.sop, _S.eop, _S.gmask, _S.pad


def _example(g, n_a, n_b):
    a = torch.randint(10, 500, (n_a,), generator=g).tolist() + [GMASK]
    span = torch.randint(10, 500, (n_b,), generator=g).tolist()
    return blank_infilling_example(a, [(len(a) - 1, span)], SOP, EOP)


def _rows():
    g = torch.Generator().manual_seed(3)
    sizes = [[(3, 4), (6, 2), (2, 7)], [(9, 5), (1, 1)], [(4, 3)]]
    return [[_example(g, a, b) for a, b in row] for row in sizes]


def test_mask_is_block_diagonal_of_the_examples_own_masks():
    rows, seq = _rows(), 32
    batch = pack(rows, seq, PAD)
    mask = ref.attention_mask(seq, seq, batch["prefix_lens"], None, 0, len(rows), "cpu",
                              batch["doc_starts"])[:, 0]
    for r, row in enumerate(rows):
        want = torch.zeros(seq, seq, dtype=torch.bool)
        at = 0
        for ex in row:
            n = len(ex.input_ids)
            alone = ref.attention_mask(n, n, torch.tensor([ex.prefix_len]), None, 0, 1,
                                       "cpu")[0, 0]
            want[at:at + n, at:at + n] = alone
            at += n
        pads = torch.ones(seq - at, seq - at, dtype=torch.bool).tril()
        want[at:, at:] = pads
        assert torch.equal(mask[r], want)
        assert mask[r].any(-1).all()  # every query sees something: no NaN rows


def _doc_layout(b, s, docs_per_row, g, causal=False):
    ds = torch.zeros(b, s, dtype=torch.long)
    pe = torch.zeros(b, s, dtype=torch.long)
    for r in range(b):
        cuts = sorted(torch.randperm(s - 1, generator=g)[:docs_per_row - 1].add(1).tolist())
        for lo, hi in zip([0] + cuts, cuts + [s]):
            ds[r, lo:hi] = lo
            pe[r, lo:hi] = lo if causal else lo + int(torch.randint(0, hi - lo + 1, (1,),
                                                                    generator=g))
    return ds, pe


@pytest.mark.parametrize("dtype,nh,ng,s,docs,blocks", [
    (torch.float32, 4, 2, 37, 5, (16, 16)),   # GQA, documents across ragged blocks
    (torch.float16, 2, 1, 40, 3, None),       # MQA, the interpreter's default tiles
    (torch.float32, 2, 2, 21, 1, (16, 16)),   # one document: the unpacked case
    (torch.float32, 2, 2, 50, 9, (32, 16))])  # documents shorter than a tile
def test_triton_packed_matches_reference(dtype, nh, ng, s, docs, blocks):
    g = torch.Generator().manual_seed(s + docs)
    b, d = 1, 16
    ds, pe = _doc_layout(b, s, docs, g)
    mk = lambda n: torch.randn(b, n, s, d, generator=g).to(dtype).requires_grad_()  # noqa
    q, k, v = mk(nh), mk(ng), mk(ng)
    o = fa.attention(q, k, v, pe, None, 0, blocks=blocks, doc_starts=ds)
    o_ref = ref.attention(q, k, v, pe, None, 0, ds)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=0, atol=tol)
    go = torch.randn(o.shape, generator=g).to(dtype)
    got = torch.autograd.grad(o, (q, k, v), go)
    want = torch.autograd.grad(o_ref, (q, k, v), go)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.float(), w.float(), rtol=0,
                                   atol=tol * max(1.0, w.float().abs().max().item()))


def test_triton_packed_decode_rows_and_causal_documents():
    # queries at the end of a cache (q_offset > 0) and documents without a prefix
    g = torch.Generator().manual_seed(1)
    b, nh, ng, sk, sq, d = 2, 2, 1, 33, 5, 16
    ds, _ = _doc_layout(b, sk, 4, g, causal=True)
    q = torch.randn(b, nh, sq, d, generator=g, requires_grad=True)
    k = torch.randn(b, ng, sk, d, generator=g, requires_grad=True)
    v = torch.randn(b, ng, sk, d, generator=g, requires_grad=True)
    o = fa.attention(q, k, v, None, None, sk - sq, blocks=(16, 16), doc_starts=ds)
    o_ref = ref.attention(q, k, v, None, None, sk - sq, ds)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=2e-5)
    got = torch.autograd.grad(o.sum(), (q, k, v))
    want = torch.autograd.grad(o_ref.sum(), (q, k, v))
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=0, atol=2e-5)


def test_kernel_rejects_packed_with_left_padding_and_bad_shapes():
    q = torch.randn(1, 2, 8, 16)
    ds = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="cannot be combined"):
        fa.attention(q, q, q, ds, torch.tensor([2]), doc_starts=ds)
    with pytest.raises(ValueError, match="doc_starts"):
        fa.attention(q, q, q, None, doc_starts=ds[:, :5])
    with pytest.raises(ValueError, match="per position"):
        fa.attention(q, q, q, torch.tensor([3]), doc_starts=ds)


def _loss_and_grads(model, batch, packed):
    kw = {"doc_starts": batch["doc_starts"]} if packed else {}
    loss = model(batch["input_ids"], position_ids=batch["position_ids"],
                 block_position_ids=batch["block_position_ids"],
                 prefix_lens=batch["prefix_lens"], labels=batch["labels"], **kw)
    total = loss.sum() / (batch["labels"] != IGNORE).sum()
    model.zero_grad()
    total.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_packed_loss_and_grads_equal_unpacked(kernels):
    # one layer: under the interpreter every Triton program costs milliseconds
    model = GLM.build(GLMConfig.preset("tiny", kernels=kernels, num_layers=1), seed=0)
    rows = _rows()[:2]
    packed = pack(rows, 32, PAD)
    flat = [ex for row in rows for ex in row]
    alone = collate(flat, 16, PAD)
    loss_p, grads_p = _loss_and_grads(model, packed, True)
    loss_u, grads_u = _loss_and_grads(model, alone, False)
    # the same labelled tokens, in the same order, with the same losses
    sel_p = loss_p[packed["labels"] != IGNORE]
    sel_u = loss_u[alone["labels"] != IGNORE]
    assert sel_p.numel() == sel_u.numel() > 0
    torch.testing.assert_close(sel_p, sel_u, rtol=0, atol=2e-5)
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=0, atol=2e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_model_refuses_per_token_prefix_without_doc_starts():
    model = GLM.build(GLMConfig.preset("tiny"), seed=0)
    batch = pack(_rows(), 32, PAD)
    with pytest.raises(ValueError, match="doc_starts"):
        model(batch["input_ids"], position_ids=batch["position_ids"],
              prefix_lens=batch["prefix_lens"])


def test_side_carries_packing_and_expands_one_prefix_per_row():
    batch = pack(_rows(), 32, PAD)
    side = Side.from_batch(batch, "cpu")
    back = Side.unpack(side.pack(), 32, 3)
    assert side.pack().numel() == Side.numel(32, 3)
    for name in ("position_ids", "block_position_ids", "prefix_lens", "doc_starts"):
        assert torch.equal(getattr(back, name), batch[name])
    plain = collate([ex for row in _rows() for ex in row], 16, PAD)
    side = Side.from_batch(plain, "cpu")
    assert torch.equal(side.prefix_lens, plain["prefix_lens"].view(-1, 1).expand(-1, 16))
    assert torch.equal(side.doc_starts, torch.zeros(6, 16, dtype=torch.long))


def test_best_fit_rows_fill_rows_and_keep_every_item_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=2000)
    rows = best_fit_rows(lengths, 48, window=256, rng=np.random.default_rng(1))
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(2000))
    fills = [int(lengths[row].sum()) for row in rows]
    assert max(fills) <= 48
    assert 1 - sum(fills) / (48 * len(rows)) < 0.05
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_rows([10, 60], 48)


def _ids():
    return SpecialIds()


def test_packed_translation_dataset_covers_each_pair_once_per_epoch():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(10, 500, (int(torch.randint(1, 15, (1,), generator=g)),),
                            generator=g).tolist(),
              torch.randint(10, 500, (int(torch.randint(1, 15, (1,), generator=g)),),
                            generator=g).tolist()) for _ in range(300)]
    ds = TranslationDataset(pairs, _ids(), 48, direction="both", seed=4, pack=True,
                            pack_window=64)
    n_rows = ds.rows_in_epoch(0)
    seen = sorted(p for row in ds._rows(0) for p, _ in row)
    assert seen == list(range(300))
    batch = ds.get_batch(0, n_rows)
    assert (batch["input_ids"] == PAD).float().mean() < 0.05
    again = TranslationDataset(pairs, _ids(), 48, direction="both", seed=4, pack=True,
                               pack_window=64).get_batch(1, 7)
    assert torch.equal(again["input_ids"], ds.get_batch(1, 7)["input_ids"])
    # a packed row holds exactly its pairs' own examples
    row = ds.packed_row(3)
    one = pack([row], 48, PAD)
    n = len(row[0].input_ids)
    assert one["input_ids"][0, :n].tolist() == row[0].input_ids
    assert {d for r in ds._rows(0) for _, d in r} == {"en-zh", "zh-en"}
