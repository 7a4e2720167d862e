"""ChatGLM2/3 and GLM-4 checkpoints (the published `THUDM/chatglm*` / `glm-4-*-chat`
safetensors layout) <-> the native GLM.

Only names change, never values or shapes. The native layouts were chosen equal to
ChatGLM's, so no permutation is needed:
  - query_key_value [q + 2*kv, h]: ChatGLM's SelfAttention splits the fused output as
    split([heads*d, groups*d, groups*d]) and views each part [s, b, n, d], i.e. rows are
    [all Q heads | all K groups | all V groups], each head's d rows contiguous; that is
    exactly model.attention.SelfAttention's split and view.
  - dense_h_to_4h [2*ffn, h]: ChatGLM's swiglu does chunk(2, -1) and silu(first) * second,
    i.e. rows [gate | up], as kernels.reference.swiglu.
  - rotary: ChatGLM rotates the first half of each head (RotaryEmbedding(kv_channels // 2))
    as adjacent (even, odd) pairs with base 10000 * rope_ratio and inv_freq over that half,
    as kernels.reference.rotary_angles with block position ids 0.
  - RMSNorm in fp32 statistics, weight applied after casting back: same as ours.
  - layout: ChatGLM2/3 and GLM-4 are causal with 1D positions and never rotate the second
    half of each head: imported configs get position_layout="causal1d" (model/config.py).
  - rope_ratio: each published model's code reads it its own way (rope_scaling): GLM-4
    and chatglm3-6b-32k/128k scale the base, chatglm2-6b-32k divides the positions,
    chatglm3-6b (Dec 2023) ignores it. Read from the checkpoint's modeling_chatglm.py
    when it ships one (`rope_scaling_from_code`), else from its name, else "base".
Export writes the native-only fields (glm_position_layout, glm_rope_scaling,
glm_chat_format) into config.json, which THUDM's code ignores, so an export re-imports
exactly.
`transformer.rotary_pos_emb.inv_freq` is a buffer ChatGLM recomputes in forward: ignored
on import, written on export for loaders that insist on it.

Only torch, safetensors, json and os: no transformers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model.config import GLMConfig
from model.glm import GLM

INDEX_FILE = "model.safetensors.index.json"
INV_FREQ = "transformer.rotary_pos_emb.inv_freq"

_TOP = {  # ChatGLM name -> native name
    "transformer.embedding.word_embeddings.weight": "embedding.weight",
    "transformer.encoder.final_layernorm.weight": "final_norm.weight",
    "transformer.output_layer.weight": "output_layer.weight",
}
_LAYER = {  # ChatGLM module inside a layer -> native module
    "input_layernorm": "input_norm",
    "self_attention.query_key_value": "attention.qkv",
    "self_attention.dense": "attention.dense",
    "post_attention_layernorm": "post_attention_norm",
    "mlp.dense_h_to_4h": "mlp.gate_up",
    "mlp.dense_4h_to_h": "mlp.down",
}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_CHATGLM_LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_NATIVE_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")


def chatglm_to_native(name: str) -> str | None:
    """Native parameter name, None for tensors we ignore (inv_freq); ValueError if the
    name is not part of the ChatGLM layout."""
    if name == INV_FREQ:
        return None
    if name in _TOP:
        return _TOP[name]
    m = _CHATGLM_LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"unexpected tensor {name!r}: not a ChatGLM2/3 / GLM-4 parameter name")


def native_to_chatglm(name: str) -> str:
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    m = _NATIVE_LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_BACK:
        return f"transformer.encoder.layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"native parameter {name!r} has no ChatGLM name")


# ---- config -----------------------------------------------------------------------------
# flags whose other value changes the architecture into one we do not implement
_REQUIRED_FLAGS = {
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "tie_word_embeddings": False,
}


def rope_scaling_from_code(code: str) -> str:
    """What a modeling_chatglm.py does with config.rope_ratio: "position" (chatglm2-6b-32k:
    `seq_idx = torch.arange(...) / self.rope_ratio`), "base" (GLM-4, chatglm3-6b-32k:
    `base = base * self.rope_ratio`) or "none" (chatglm3-6b: never reads it)."""
    divides = re.search(r"/\s*\(?\s*self\.rope_ratio", code) is not None
    multiplies = re.search(r"\*\s*\(?\s*self\.rope_ratio", code) is not None
    if divides and multiplies:
        raise ValueError("modeling_chatglm.py both divides and multiplies by rope_ratio: "
                         "pass rope_scaling explicitly")
    if divides:
        return "position"
    if multiplies:
        return "base"
    if "rope_ratio" not in code:
        return "none"
    raise ValueError("modeling_chatglm.py reads rope_ratio in a way not recognised: pass "
                     "rope_scaling explicitly (base | position | none)")


def _default_chat_format(c: dict) -> str:
    """From the published name: chat models get their prompt, base models none."""
    name = str(c.get("_name_or_path") or "").lower()
    if "base" in name:
        return ""
    if "chatglm2" in name:
        return "chatglm2"
    if "chatglm3" in name or ("glm-4" in name and "chat" in name):
        return "chatglm3"
    return ""


def _default_rope_scaling(c: dict) -> str:
    name = str(c.get("_name_or_path") or "").lower()
    return "position" if "chatglm2" in name and "32k" in name else "base"


def config_from_chatglm(config_json: dict, code: str | None = None,
                        **overrides) -> GLMConfig:
    """GLMConfig from a ChatGLM2/3 / GLM-4 `config.json` dict; `code` is the checkpoint's
    modeling_chatglm.py text when it has one (how rope_ratio applies); `overrides` set
    native-only fields (kernels, init_std, rope_scaling, chat_format, ...). Flags that are
    numerically neutral in ChatGLM's own code (apply_query_key_layer_scaling,
    attention_softmax_in_fp32, original_rope, fp32_residual_connection,
    bias_dropout_fusion) are accepted and dropped."""
    c = dict(config_json)
    model_type = c.get("model_type", "chatglm")
    if model_type != "chatglm":
        raise ValueError(f"model_type={model_type!r} is not supported: expected 'chatglm' "
                         "(the THUDM ChatGLM2/3 / GLM-4 remote-code layout)")
    for flag, want in _REQUIRED_FLAGS.items():
        if flag in c and c[flag] is not None and bool(c[flag]) != want:
            raise ValueError(f"{flag}={c[flag]!r} is not supported (only {want} is implemented)")
    if c.get("pre_seq_len") is not None:
        raise ValueError(f"pre_seq_len={c['pre_seq_len']!r} is not supported "
                         "(P-tuning prefix encoders are not implemented)")
    required = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "padded_vocab_size", "seq_length")
    missing = [k for k in required if c.get(k) is None]
    if missing:
        raise ValueError(f"ChatGLM config is missing {', '.join(missing)}")
    heads = c["num_attention_heads"]
    kv_channels = c.get("kv_channels") or c["hidden_size"] // heads
    groups = c.get("multi_query_group_num") if c.get("multi_query_attention") else heads
    if groups is None:
        raise ValueError("multi_query_attention=True but multi_query_group_num is missing")
    fields = dict(
        num_layers=c["num_layers"], hidden_size=c["hidden_size"], num_attention_heads=heads,
        multi_query_group_num=groups, kv_channels=kv_channels,
        ffn_hidden_size=c["ffn_hidden_size"], padded_vocab_size=c["padded_vocab_size"],
        seq_length=c["seq_length"], rope_ratio=float(c.get("rope_ratio") or 1.0),
        layernorm_epsilon=float(c.get("layernorm_epsilon", 1e-5)),
        add_qkv_bias=bool(c.get("add_qkv_bias", False)),
        add_bias_linear=bool(c.get("add_bias_linear", False)),
        hidden_dropout=float(c.get("hidden_dropout") or 0.0),
        attention_dropout=float(c.get("attention_dropout") or 0.0),
        position_layout=c.get("glm_position_layout", "causal1d"),
        chat_format=c.get("glm_chat_format", _default_chat_format(c)),
    )
    if "glm_rope_scaling" in c:      # our own export
        fields["rope_scaling"] = c["glm_rope_scaling"]
    elif "rope_scaling" not in overrides:
        fields["rope_scaling"] = (rope_scaling_from_code(code) if code is not None
                                  else _default_rope_scaling(c))
    if fields["position_layout"] != "causal1d":
        fields["chat_format"] = ""
    return GLMConfig(**{**fields, **overrides})


def chatglm_config(config: GLMConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The `config.json` a ChatGLM2/3 loader expects for this model."""
    return {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size,
        "kv_channels": config.kv_channels,
        "num_attention_heads": config.num_attention_heads,
        "multi_query_attention": config.multi_query_group_num != config.num_attention_heads,
        "multi_query_group_num": config.multi_query_group_num,
        "padded_vocab_size": config.padded_vocab_size,
        "seq_length": config.seq_length,
        "rope_ratio": config.rope_ratio,
        # native-only, ignored by THUDM's code; they make an export re-import exactly
        "glm_rope_scaling": config.rope_scaling,
        "glm_position_layout": config.position_layout,
        "glm_chat_format": config.chat_format,
        "layernorm_epsilon": config.layernorm_epsilon,
        "add_qkv_bias": config.add_qkv_bias,
        "add_bias_linear": config.add_bias_linear,
        "hidden_dropout": config.hidden_dropout,
        "attention_dropout": config.attention_dropout,
        "rmsnorm": True,
        "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False,
        "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True,
        "fp32_residual_connection": False,
        "original_rope": True,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---- import -----------------------------------------------------------------------------
def _weight_map(ckpt_dir: str) -> dict[str, str]:
    """ChatGLM tensor name -> safetensors file, from the index or by scanning the files."""
    index = os.path.join(ckpt_dir, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        for fname in sorted(set(weight_map.values())):
            if not os.path.exists(os.path.join(ckpt_dir, fname)):
                raise ValueError(f"{index} lists {fname!r}, which does not exist")
        return weight_map
    files = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors"))
    if not files:
        hint = (" (PyTorch .bin checkpoints are not supported: convert them to safetensors)"
                if any(f.endswith(".bin") for f in os.listdir(ckpt_dir)) else "")
        raise ValueError(f"no *.safetensors files in {ckpt_dir}{hint}")
    weight_map = {}
    for fname in files:
        with safe_open(os.path.join(ckpt_dir, fname), framework="pt") as f:
            for name in f.keys():
                if name in weight_map:
                    raise ValueError(f"tensor {name!r} is in both {weight_map[name]} and {fname}")
                weight_map[name] = fname
    return weight_map


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor):
    """Replace a (meta) parameter by `value`, keeping requires_grad."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, leaf)
    setattr(module, leaf, nn.Parameter(value, requires_grad=old.requires_grad))


def load_chatglm(ckpt_dir: str, device="cpu", dtype: torch.dtype | None = None,
                 layer_range: tuple[int, int] | None = None, pre_process: bool = True,
                 post_process: bool = True, **config_overrides) -> GLM:
    """Load a ChatGLM2/3 / GLM-4 directory (config.json + safetensors) into a GLM.

    The model is built on the meta device and filled tensor by tensor straight from the
    memory-mapped files, cast to `dtype` (default: as stored) on `device`: peak memory is
    the model in its final dtype plus one tensor. A pipeline stage (layer_range,
    pre_process, post_process) loads only its own tensors. Any missing, unexpected or
    wrongly shaped tensor is a one-line ValueError naming it."""
    cfg_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{cfg_path} does not exist")
    with open(cfg_path) as f:
        config_json = json.load(f)
    code_path = os.path.join(ckpt_dir, "modeling_chatglm.py")
    code = None
    if os.path.isfile(code_path):
        with open(code_path, encoding="utf-8") as f:
            code = f.read()
    config = config_from_chatglm(config_json, code, **config_overrides)
    with torch.device("meta"):
        model = GLM(config, layer_range=layer_range, pre_process=pre_process,
                    post_process=post_process)
        full = GLM(config)  # names a whole model has; free on meta
    expected = dict(model.named_parameters())
    known = {n for n, _ in full.named_parameters()}
    weight_map = _weight_map(ckpt_dir)

    by_file: dict[str, list[str]] = {}
    for name in sorted(weight_map):
        native = chatglm_to_native(name)
        if native is None:
            continue
        if native not in known:
            raise ValueError(f"unexpected tensor {name!r} in {weight_map[name]} "
                             f"(no {native!r} in this config)")
        if native in expected:  # other stages' tensors are skipped, not unexpected
            by_file.setdefault(weight_map[name], []).append(name)
    for native in expected:
        if native_to_chatglm(native) not in weight_map:
            raise ValueError(f"checkpoint {ckpt_dir} is missing tensor "
                             f"{native_to_chatglm(native)!r} (native {native!r})")
    for fname, names in by_file.items():
        with safe_open(os.path.join(ckpt_dir, fname), framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ValueError(f"tensor {name!r} is listed for {fname} but not in it")
                native = chatglm_to_native(name)
                want = tuple(expected[native].shape)
                got = tuple(f.get_slice(name).get_shape())
                if got != want:
                    raise ValueError(f"tensor {name!r} has shape {list(got)}, the config "
                                     f"expects {list(want)}")
                t = f.get_tensor(name).to(device=device, dtype=dtype)
                _set_tensor(model, native, t)
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:  # cannot happen with the checks above unless GLM grows a new tensor
        raise ValueError(f"no checkpoint value for {leftover[0]!r}")
    return model


# ---- export -----------------------------------------------------------------------------
def _chatglm_tensors(model: GLM) -> list[tuple[str, torch.Tensor]]:
    """(ChatGLM name, CPU contiguous tensor) in checkpoint order."""
    out = [(native_to_chatglm(n), p.detach().to("cpu").contiguous())
           for n, p in model.named_parameters()]
    half = model.config.kv_channels // 2
    # what ChatGLM's RotaryEmbedding(kv_channels // 2) registers: base 10000, rope_ratio
    # is applied in its forward, and the values are never read there
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
    out.append((INV_FREQ, inv_freq.to(model.embedding.weight.dtype)))
    return out


def _plan_shards(tensors, max_shard_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    shards, current, size = [], [], 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:  # a huge tensor gets its own shard
            shards.append(current)
            current, size = [], 0
        current.append((name, t))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def export_chatglm(model: GLM, out_dir: str, max_shard_bytes: int = 2 * 1024 ** 3,
                   overwrite: bool = False) -> list[str]:
    """Write `model` as a ChatGLM checkpoint: model-0000i-of-0000n.safetensors, the index
    json and config.json. Written into a temporary sibling directory and renamed into
    place, so a failure leaves no partial output and an existing `out_dir` (replaced only
    with overwrite=True) untouched. Returns the shard file names."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    if not (model.pre_process and model.post_process
            and model.layer_range == (0, model.config.num_layers)):
        raise ValueError("export_chatglm needs the whole model, not a pipeline stage "
                         f"(layer_range={model.layer_range})")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        shards = _plan_shards(_chatglm_tensors(model), max_shard_bytes)
        weight_map, names, total = {}, [], 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(dict(shard), os.path.join(tmp, fname), metadata={"format": "pt"})
            for name, t in shard:
                weight_map[name] = fname
                total += t.numel() * t.element_size()
            names.append(fname)
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                      indent=2, sort_keys=True)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(chatglm_config(model.config, model.embedding.weight.dtype), f, indent=2)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def _swap_into_place(tmp: str, out_dir: str):
    """rename(tmp -> out_dir); an existing out_dir is moved aside first and restored if the
    second rename fails (directories cannot be replaced in one atomic rename)."""
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-",
                              dir=os.path.dirname(out_dir))
    os.rmdir(backup)  # only the unique name is wanted
    os.rename(out_dir, backup)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)
