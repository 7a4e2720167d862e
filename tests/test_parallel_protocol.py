"""The model side of model/parallel_protocol.py, in one process: the split forward API
(hidden states, then the head) gives exactly what forward gives, the fused SwiGLU path
maps a MapsInput gate_up's input, attention takes its head counts from use_projections,
and set_dropout_rng reaches every dropout site."""
import contextlib

import pytest
import torch
from torch import nn

from engine.tensor_parallel import ColumnParallelLinear
from model import GLM, GLMConfig
from model.parallel_protocol import LossHead, MapsInput, mapped_input


def _tiny(**kw):
    return GLM.build(GLMConfig.preset("tiny", kernels="torch", **kw), seed=3)


def test_hidden_then_head_is_forward_bitwise():
    model = _tiny()
    ids = torch.randint(0, 1000, (2, 9))
    labels = torch.randint(0, 1000, (2, 9))
    labels[:, :3] = -100
    h = model.hidden(ids)
    assert h.shape == (9, 2, model.config.hidden_size)
    assert torch.equal(model.logits(h), model(ids))
    assert torch.equal(model.head_loss(h, labels), model(ids, labels=labels))
    first = GLM.build(model.config, seed=3, layer_range=(0, 2), post_process=False)
    assert torch.equal(first(ids), first.hidden(ids))   # no head on a non-final stage


def test_plain_layers_are_not_parallel_ones():
    model = _tiny()
    assert not isinstance(model.output_layer, LossHead)
    mlp = model.layers["0"].mlp
    assert not isinstance(mlp.gate_up, MapsInput)
    x = torch.randn(3, 4)
    assert mapped_input(mlp.gate_up, x) is x
    # a column-parallel layer's forward multiplies its weight by input_map(x)
    col = ColumnParallelLinear(4, 6, False, group=None)
    assert isinstance(col, MapsInput)


class _Marked(nn.Linear):
    """A gate_up that maps its input (here: doubles it) before the weight multiplies it."""

    def input_map(self, x):
        return 2 * x


def test_fused_swiglu_maps_the_input_of_a_mapping_gate_up():
    model = _tiny()
    mlp = model.layers["0"].mlp
    x = torch.randn(5, 2, model.config.hidden_size)
    marked = _Marked(mlp.gate_up.in_features, mlp.gate_up.out_features, bias=False)
    with torch.no_grad():
        marked.weight.copy_(mlp.gate_up.weight)
    plain = mlp(2 * x)
    mlp.gate_up = marked
    assert torch.equal(mlp(x), plain)


def test_use_projections_sets_head_counts_and_checks_widths():
    model = _tiny()
    c = model.config
    attn = model.layers["0"].attention
    d, heads, groups = c.kv_channels, c.num_attention_heads // 2, 1
    qkv = nn.Linear(c.hidden_size, (heads + 2 * groups) * d)
    dense = nn.Linear(heads * d, c.hidden_size)
    attn.use_projections(qkv, dense, heads, groups)
    assert (attn.num_heads, attn.num_groups) == (heads, groups)
    assert model.new_kv_cache(1, 4).k[0].shape[1] == groups
    with pytest.raises(ValueError, match="qkv has"):
        attn.use_projections(qkv, dense, heads, groups + 1)
    with pytest.raises(ValueError, match="dense has"):
        attn.use_projections(qkv, nn.Linear(d, c.hidden_size), heads, groups)


def test_set_dropout_rng_reaches_embedding_and_every_block():
    model = _tiny(hidden_dropout=0.5).train()
    entered = []

    @contextlib.contextmanager
    def rng():
        entered.append(1)
        yield

    model.set_dropout_rng(rng)
    model(torch.randint(0, 1000, (1, 4)))
    # the embedding, then two residual dropouts per block
    assert len(entered) == 1 + 2 * len(model.layers)
