import pytest
import torch

from kernels.reference import attention_mask
from model import GLM, GLMConfig
from model.masks import IGNORE, blank_infilling_example, collate, corrupt_spans


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible by "
                                         "multi_query_group_num=4"):
        GLMConfig(num_attention_heads=6, multi_query_group_num=4)
    with pytest.raises(ValueError, match="hidden_size"):
        GLMConfig(hidden_size=0)
    with pytest.raises(ValueError, match="kv_channels=6"):
        GLMConfig(kv_channels=6)
    with pytest.raises(ValueError, match="kernels"):
        GLMConfig(kernels="cuda")
    with pytest.raises(ValueError, match="hidden_dropout=1.0"):
        GLMConfig(hidden_dropout=1.0)
    with pytest.raises(ValueError, match="attention_dropout=0.1 is not supported"):
        GLMConfig(attention_dropout=0.1)
    with pytest.raises(ValueError, match="unknown preset"):
        GLMConfig.preset("chatglm9")
    with pytest.raises(ValueError, match="unknown GLMConfig field"):
        GLMConfig.from_dict({"hidden": 3})


def _meta_count(name):
    with torch.device("meta"):
        return GLM(GLMConfig.preset(name)).num_params()


def test_published_parameter_counts():
    assert _meta_count("chatglm2-6b") == 6_243_584_000
    assert _meta_count("chatglm3-6b") == 6_243_584_000
    assert _meta_count("tiny") < 1_000_000
    assert 5_000_000 <= _meta_count("small") <= 15_000_000


def test_rotary_with_zero_block_ids_leaves_second_half_untouched():
    from kernels.reference import apply_rotary, rotary_angles
    x = torch.randn(5, 2, 3, 16)
    pos = torch.arange(5).view(5, 1).expand(5, 2)
    cos, sin = rotary_angles(pos, torch.zeros_like(pos), 16, 10000.0)
    y = apply_rotary(x, cos.unsqueeze(2), sin.unsqueeze(2))
    assert torch.equal(y[..., 8:], x[..., 8:])
    assert not torch.allclose(y[1:, ..., :8], x[1:, ..., :8])
    # a rotation preserves the norm of every adjacent pair
    pairs = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(y), pairs(x))


def test_mask_semantics_hand_worked():
    # sequence of 4, prefix 2: rows = queries, cols = keys
    m = attention_mask(4, 4, torch.tensor([2]), None, 0, 1, "cpu")[0, 0].int().tolist()
    assert m == [[1, 1, 0, 0],
                 [1, 1, 0, 0],
                 [1, 1, 1, 0],
                 [1, 1, 1, 1]]
    # one left pad: the pad never serves as a key to real tokens
    m = attention_mask(3, 3, torch.tensor([0]), torch.tensor([1]), 0, 1, "cpu")[0, 0]
    assert m.int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_blank_infilling_positions_hand_worked():
    # text x1..x6 with spans [x3] and [x5 x6]; Part A = x1 x2 M x4 M; Part B shuffled
    M, S, E = 100, 101, 102
    part_a = [1, 2, M, 4, M]
    ex = blank_infilling_example(part_a, [(4, [5, 6]), (2, [3])], S, E)
    assert ex.input_ids == [1, 2, M, 4, M, S, 5, 6, S, 3]
    assert ex.position_ids == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]
    assert ex.block_position_ids == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert ex.labels == [IGNORE] * 5 + [5, 6, E, 3, E]
    assert ex.prefix_len == 5


def test_span_corruption_masks_each_token_once():
    g = torch.Generator().manual_seed(3)
    tokens = list(range(10, 50))
    ex = corrupt_spans(tokens, mask_id=1, sop_id=2, eop_id=3, generator=g)
    part_a = ex.input_ids[:ex.prefix_len]
    masked = [t for t in ex.labels if t not in (IGNORE, 3)]
    kept = [t for t in part_a if t != 1]
    assert sorted(masked + kept) == tokens
    assert 4 <= len(masked) <= 8  # ~15% of 40


def _tiny(**kw):
    return GLM.build(GLMConfig.preset("tiny", **kw), seed=0)


def test_prefix_lm_semantics():
    model = _tiny().eval()
    ids = torch.randint(0, 1000, (1, 12))
    prefix = torch.tensor([6])
    base = model(ids, prefix_lens=prefix)
    # changing a suffix token does not change any prefix output
    ids2 = ids.clone()
    ids2[0, 9] = (ids2[0, 9] + 1) % 1000
    out2 = model(ids2, prefix_lens=prefix)
    torch.testing.assert_close(out2[0, :6], base[0, :6], rtol=0, atol=0)
    assert not torch.allclose(out2[0, 9:], base[0, 9:])
    # changing a later prefix token changes earlier prefix outputs (bidirectional)
    ids3 = ids.clone()
    ids3[0, 5] = (ids3[0, 5] + 1) % 1000
    out3 = model(ids3, prefix_lens=prefix)
    assert not torch.allclose(out3[0, 0], base[0, 0])
    # ...but not under a causal mask
    c1, c3 = model(ids), model(ids3)
    torch.testing.assert_close(c3[0, :5], c1[0, :5], rtol=0, atol=0)


def test_stage_slices_compose_to_the_full_model():
    cfg = GLMConfig.preset("tiny")
    full = GLM.build(cfg, seed=1)
    first = GLM.build(cfg, seed=1, layer_range=(0, 2), post_process=False)
    last = GLM.build(cfg, seed=1, layer_range=(2, 4), pre_process=False)
    for name, p in first.named_parameters():
        assert torch.equal(p, full.get_parameter(name)), name
    ids = torch.randint(0, 1000, (2, 9))
    torch.testing.assert_close(last(hidden_states=first(ids)), full(ids), rtol=0, atol=0)


def test_loss_and_batch_collation():
    model = _tiny()
    M, S, E = 3, 4, 5
    ex = blank_infilling_example([7, 8, M, 9], [(2, [10, 11])], S, E)
    batch = collate([ex, ex], seq_len=10, pad_id=0)
    losses = model(batch["input_ids"], position_ids=batch["position_ids"],
                   block_position_ids=batch["block_position_ids"],
                   prefix_lens=batch["prefix_lens"], labels=batch["labels"])
    valid = batch["labels"] != IGNORE
    assert valid.sum() == 6
    assert torch.all(losses[~valid] == 0) and torch.all(losses[valid] > 0)
    losses[valid].mean().backward()
    assert all(p.grad is not None for p in model.parameters())
