"""ChatGLM2/3 / GLM-4 checkpoint import and export."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import GLM, GLMConfig
from model import convert
from model.convert import (INDEX_FILE, INV_FREQ, config_from_chatglm, export_chatglm,
                           load_chatglm, native_to_chatglm)

# THUDM/chatglm3-6b config.json as published (auto_map omitted)
CHATGLM3_6B = {
    "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm",
    "architectures": ["ChatGLMModel"], "add_bias_linear": False, "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696, "fp32_residual_connection": False, "hidden_dropout": 0.0,
    "hidden_size": 4096, "kv_channels": 128, "layernorm_epsilon": 1e-05,
    "multi_query_attention": True, "multi_query_group_num": 2, "num_attention_heads": 32,
    "num_layers": 28, "original_rope": True, "padded_vocab_size": 65024,
    "post_layer_norm": True, "rmsnorm": True, "seq_length": 8192, "use_cache": True,
    "torch_dtype": "float16", "transformers_version": "4.30.2",
    "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
}


def tiny(**kw):
    return GLMConfig.preset("tiny", **kw)


def snapshot(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def chatglm_reference_logits(sd, cfg, ids):
    """A forward written the way THUDM's ChatGLM2 modeling code computes it, on ChatGLM
    tensor names: [s, b, h], fused QKV split [np*hn | ng*hn | ng*hn], KV groups expanded
    with unsqueeze/expand, rotary on the first kv_channels // 2 dims as adjacent pairs,
    causal attention, swiglu by chunk. Independent of model/attention.py."""
    b, s = ids.shape
    nh, ng, hn, eps = (cfg.num_attention_heads, cfg.multi_query_group_num, cfg.kv_channels,
                       cfg.layernorm_epsilon)
    rot = hn // 2
    theta = 1.0 / ((10000 * cfg.rope_ratio) ** (torch.arange(0, rot, 2).float() / rot))
    angles = torch.outer(torch.arange(s).float(), theta)
    cache = torch.stack([angles.cos(), angles.sin()], -1).view(s, 1, 1, rot // 2, 2)

    def rope(t):  # [s, b, n, hn]
        t_rot, t_pass = t[..., :rot], t[..., rot:]
        ts = t_rot.reshape(s, b, t.shape[2], rot // 2, 2)
        out = torch.stack([ts[..., 0] * cache[..., 0] - ts[..., 1] * cache[..., 1],
                           ts[..., 1] * cache[..., 0] + ts[..., 0] * cache[..., 1]], -1)
        return torch.cat([out.flatten(3), t_pass], -1)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))

    x = F.embedding(ids, sd["transformer.embedding.word_embeddings.weight"]).transpose(0, 1)
    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}."
        qkv = lin(rms(x, sd[p + "input_layernorm.weight"]), p + "self_attention.query_key_value")
        q, k, v = qkv.split([nh * hn, ng * hn, ng * hn], dim=-1)
        q, k = rope(q.view(s, b, nh, hn)), rope(k.view(s, b, ng, hn))
        k, v = (t.view(s, b, ng, 1, hn).expand(s, b, ng, nh // ng, hn).reshape(s, b, nh, hn)
                for t in (k, v.view(s, b, ng, hn)))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + lin(ctx.permute(2, 0, 1, 3).reshape(s, b, nh * hn), p + "self_attention.dense")
        gate, up = lin(rms(x, sd[p + "post_attention_layernorm.weight"]),
                       p + "mlp.dense_h_to_4h").chunk(2, dim=-1)
        x = x + lin(F.silu(gate) * up, p + "mlp.dense_4h_to_h")
    x = rms(x, sd["transformer.encoder.final_layernorm.weight"])
    return F.linear(x, sd["transformer.output_layer.weight"]).transpose(0, 1)


@pytest.mark.parametrize("bias", [False, True])
def test_export_import_round_trip(tmp_path, bias):
    cfg = tiny(add_bias_linear=bias)
    model = GLM.build(cfg, seed=1)
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up would show
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", ".bias")):
                p.uniform_(0.5, 1.5)
    out = tmp_path / "ckpt"
    shards = export_chatglm(model, str(out), max_shard_bytes=200_000)
    assert len(shards) > 1
    index = json.loads((out / INDEX_FILE).read_text())
    params = dict(model.named_parameters())
    assert set(index["weight_map"]) == {native_to_chatglm(n) for n in params} | {INV_FREQ}
    assert set(index["weight_map"].values()) == set(shards)
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    assert index["metadata"]["total_size"] == nbytes + (cfg.kv_channels // 4) * 4
    # published names and shapes
    layer1 = "transformer.encoder.layers.1."
    with safe_open(str(out / index["weight_map"][layer1 + "mlp.dense_h_to_4h.weight"]),
                   "pt") as f:
        assert f.get_slice(layer1 + "mlp.dense_h_to_4h.weight").get_shape() == [344, 64]
    assert config_from_chatglm(json.loads((out / "config.json").read_text())) == cfg

    loaded = load_chatglm(str(out))
    got = dict(loaded.named_parameters())
    assert set(got) == set(params)
    for n, p in params.items():
        assert got[n].dtype == p.dtype and torch.equal(got[n], p), n
    ids = torch.randint(0, cfg.padded_vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids, prefix_lens=torch.tensor([4, 0])),
                           model(ids, prefix_lens=torch.tensor([4, 0])))


def test_native_layout_is_chatglm_layout(tmp_path):
    """Our forward on a model equals a ChatGLM2-style forward on its exported tensors:
    the QKV / gate-up row orders and the rotary pairing need no permutation."""
    cfg = tiny(add_bias_linear=True, rope_ratio=3.0)
    model = GLM.build(cfg, seed=2)
    export_chatglm(model, str(tmp_path / "c"), max_shard_bytes=10 ** 9)
    sd = {}
    for f in os.listdir(tmp_path / "c"):
        if f.endswith(".safetensors"):
            sd.update(load_file(str(tmp_path / "c" / f)))
    ids = torch.randint(0, cfg.padded_vocab_size, (2, 11))
    with torch.no_grad():
        ours = model(ids)
        theirs = chatglm_reference_logits(sd, cfg, ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    # the check can fail: swapping the two KV groups' rows changes the logits
    qkv = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    q, d = cfg.q_size, cfg.kv_channels
    sd[qkv] = torch.cat([sd[qkv][:q], sd[qkv][q + d:q + 2 * d], sd[qkv][q:q + d],
                         sd[qkv][q + 2 * d:]])
    with torch.no_grad():
        assert (chatglm_reference_logits(sd, cfg, ids) - ours).abs().max() > 1e-3


def test_half_precision_checkpoint_keeps_or_casts_dtype(tmp_path):
    model = GLM.build(tiny(), seed=3).to(torch.bfloat16)
    export_chatglm(model, str(tmp_path / "bf16"))
    as_stored = load_chatglm(str(tmp_path / "bf16"))
    assert {p.dtype for p in as_stored.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == \
        "bfloat16"
    upcast = load_chatglm(str(tmp_path / "bf16"), dtype=torch.float32)
    for (n, a), b in zip(model.named_parameters(), upcast.parameters()):
        assert b.dtype == torch.float32 and torch.equal(b, a.float()), n


def test_single_file_and_stage_loading(tmp_path):
    model = GLM.build(tiny(), seed=4)
    ckpt = tmp_path / "one"
    assert export_chatglm(model, str(ckpt)) == ["model-00001-of-00001.safetensors"]
    os.remove(ckpt / INDEX_FILE)  # a plain single-file checkpoint
    stage = load_chatglm(str(ckpt), layer_range=(2, 4), pre_process=False)
    assert list(stage.layers.keys()) == ["2", "3"] and stage.embedding is None
    ref = dict(model.named_parameters())
    for n, p in stage.named_parameters():
        assert torch.equal(p, ref[n]), n


def test_config_from_chatglm3_6b_counts_parameters():
    cfg = config_from_chatglm(CHATGLM3_6B)
    assert (cfg.num_layers, cfg.multi_query_group_num, cfg.kv_channels, cfg.seq_length) == \
        (28, 2, 128, 8192)
    assert cfg.add_qkv_bias and not cfg.add_bias_linear and cfg.rope_ratio == 1.0
    with torch.device("meta"):
        assert GLM(cfg).num_params() == 6_243_584_000
    glm4 = config_from_chatglm({**CHATGLM3_6B, "num_layers": 40, "padded_vocab_size": 151552,
                                "rope_ratio": 500, "layernorm_epsilon": 1.5625e-07,
                                "seq_length": 131072}, kernels="torch")
    assert glm4.rope_ratio == 500.0 and glm4.kernels == "torch"
    mha = config_from_chatglm({**CHATGLM3_6B, "multi_query_attention": False})
    assert mha.multi_query_group_num == 32


@pytest.mark.parametrize("change, match", [
    ({"rmsnorm": False}, "rmsnorm=False is not supported"),
    ({"apply_residual_connection_post_layernorm": True},
     "apply_residual_connection_post_layernorm=True is not supported"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=True"),
    ({"pre_seq_len": 128}, "pre_seq_len=128"),
    ({"model_type": "glm"}, "model_type='glm'"),
    ({"num_layers": None}, "missing num_layers"),
    ({"multi_query_group_num": 3}, "multi_query_group_num=3"),
])
def test_config_from_chatglm_rejects(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_chatglm({**CHATGLM3_6B, **change})


def _rewrite(ckpt, name, value=None):
    """Replace (value) or drop (None) one tensor in an exported checkpoint."""
    index_path = ckpt / INDEX_FILE
    index = json.loads(index_path.read_text())
    # a new tensor goes into the first shard
    fname = index["weight_map"].get(name, min(index["weight_map"].values()))
    tensors = load_file(str(ckpt / fname))
    if value is None:
        del tensors[name], index["weight_map"][name]
    else:
        tensors[name] = value
        index["weight_map"][name] = fname
    save_file(tensors, str(ckpt / fname))
    index_path.write_text(json.dumps(index))


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    model = GLM.build(tiny(), seed=5)
    ckpt = tmp_path / "ckpt"
    down = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    qkv = "transformer.encoder.layers.2.self_attention.query_key_value.weight"

    export_chatglm(model, str(ckpt), max_shard_bytes=300_000)
    _rewrite(ckpt, down)
    with pytest.raises(ValueError, match=f"missing tensor '{down}'") as e:
        load_chatglm(str(ckpt))
    assert "\n" not in str(e.value)

    export_chatglm(model, str(ckpt), max_shard_bytes=300_000, overwrite=True)
    _rewrite(ckpt, qkv, torch.zeros(127, 64))
    with pytest.raises(ValueError, match=rf"'{qkv}' has shape \[127, 64\].*\[128, 64\]"):
        load_chatglm(str(ckpt))

    export_chatglm(model, str(ckpt), max_shard_bytes=300_000, overwrite=True)
    extra = "transformer.encoder.layers.7.mlp.dense_4h_to_h.weight"  # tiny has 4 layers
    _rewrite(ckpt, extra, torch.zeros(64, 172))
    with pytest.raises(ValueError, match=f"unexpected tensor '{extra}'"):
        load_chatglm(str(ckpt))
    _rewrite(ckpt, extra)
    _rewrite(ckpt, "transformer.prefix_encoder.embedding.weight", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.prefix_encoder"):
        load_chatglm(str(ckpt))

    for f in os.listdir(ckpt):
        if f.endswith(".safetensors"):
            os.remove(ckpt / f)
    with pytest.raises(ValueError, match="does not exist"):
        load_chatglm(str(ckpt))
    os.remove(ckpt / INDEX_FILE)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_chatglm(str(ckpt))


def test_failed_export_leaves_existing_dir_untouched(tmp_path, monkeypatch):
    old = GLM.build(tiny(), seed=6)
    ckpt = tmp_path / "ckpt"
    export_chatglm(old, str(ckpt), max_shard_bytes=300_000)
    (ckpt / "tokenizer.model").write_bytes(b"user file")
    before = snapshot(ckpt)

    new = GLM.build(tiny(), seed=7)
    with pytest.raises(FileExistsError):
        export_chatglm(new, str(ckpt))
    assert snapshot(ckpt) == before

    real_save, calls = convert.save_file, []

    def save_then_fail(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second shard: the first one is already on disk
            raise OSError("disk full (injected)")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(convert, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_chatglm(new, str(ckpt), max_shard_bytes=300_000, overwrite=True)
    assert len(calls) == 2
    assert snapshot(ckpt) == before
    assert os.listdir(tmp_path) == ["ckpt"]  # no temp or backup directory left behind
    monkeypatch.setattr(convert, "save_file", real_save)

    export_chatglm(new, str(ckpt), max_shard_bytes=300_000, overwrite=True)
    assert os.listdir(tmp_path) == ["ckpt"]
    reloaded = dict(load_chatglm(str(ckpt)).named_parameters())
    for n, p in new.named_parameters():
        assert torch.equal(reloaded[n], p), n
