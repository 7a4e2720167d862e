"""A plain-torch ChatGLM2/3 / GLM-4 forward written from the published semantics of
THUDM's modeling_chatglm.py (read, not copied), on the published tensor names, plus a
builder for tiny ChatGLM checkpoint directories. It shares no code with model/: the
parity tests compare the engine against this, not against itself.

Published semantics implemented here:
  - RotaryEmbedding(kv_channels // 2): theta_i = base^(-2i/n), n = kv_channels // 2,
    i < n/2; the cache [seq, n/2, 2] holds (cos, sin) of seq_idx * theta_i.
    rope_ratio: "base" -> base = 10000 * rope_ratio (GLM-4, chatglm3-6b-32k);
    "position" -> seq_idx = arange(seq) / rope_ratio (chatglm2-6b-32k); "none" ignores it.
  - apply_rotary_pos_emb: the first n channels of each head, as interleaved pairs
    (x[2i], x[2i+1]); the last kv_channels - n channels pass through unrotated.
  - position ids 0..s-1; causal attention; query head h reads KV group h // (np / ng);
    scores / sqrt(head dim), softmax in fp32.
  - pre-norm blocks (RMSNorm with fp32 statistics), SwiGLU chunk(2) [gate | up],
    final RMSNorm, untied output layer.
"""
from __future__ import annotations

import json
import math
import os

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

L = "transformer.encoder.layers.{}."


def rope_cache(seq_len: int, kv_channels: int, rope_ratio: float, scaling: str):
    n = kv_channels // 2
    base = 10000.0 * rope_ratio if scaling == "base" else 10000.0
    theta = 1.0 / (base ** (torch.arange(0, n, 2, dtype=torch.float) / n))
    seq_idx = torch.arange(seq_len, dtype=torch.float)
    if scaling == "position":
        seq_idx = seq_idx / rope_ratio
    ang = torch.outer(seq_idx, theta).float()
    return torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1)   # [s, n/2, 2]


def apply_rope(x, cache):
    # x [s, heads, d]; cache [s, n/2, 2]
    rot = cache.shape[-2] * 2
    xr, passthrough = x[..., :rot], x[..., rot:]
    xs = xr.reshape(x.shape[0], x.shape[1], rot // 2, 2)
    c = cache.view(x.shape[0], 1, rot // 2, 2)
    out = torch.stack([xs[..., 0] * c[..., 0] - xs[..., 1] * c[..., 1],
                       xs[..., 1] * c[..., 0] + xs[..., 0] * c[..., 1]], -1).flatten(2)
    return torch.cat([out, passthrough], dim=-1)


def rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class ChatGLMReference:
    def __init__(self, ckpt_dir: str, scaling: str):
        with open(os.path.join(ckpt_dir, "config.json")) as f:
            self.c = json.load(f)
        self.w = {}
        for name in os.listdir(ckpt_dir):
            if name.endswith(".safetensors"):
                self.w.update(load_file(os.path.join(ckpt_dir, name)))
        self.scaling = scaling

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] fp32 for one unpadded sequence."""
        c, w = self.c, self.w
        s = len(ids)
        nh, d = c["num_attention_heads"], c["kv_channels"]
        ng = c["multi_query_group_num"] if c["multi_query_attention"] else nh
        eps = c["layernorm_epsilon"]
        cache = rope_cache(s, d, float(c.get("rope_ratio", 1.0)), self.scaling)
        h = w["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]   # [s, H]
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        for i in range(c["num_layers"]):
            p = L.format(i)
            x = rms(h, w[p + "input_layernorm.weight"], eps)
            qkv = F.linear(x, w[p + "self_attention.query_key_value.weight"],
                           w.get(p + "self_attention.query_key_value.bias"))
            q, k, v = qkv.split([nh * d, ng * d, ng * d], dim=-1)
            q = apply_rope(q.view(s, nh, d), cache)
            k = apply_rope(k.view(s, ng, d), cache)
            v = v.view(s, ng, d)
            k = k.repeat_interleave(nh // ng, dim=1)
            v = v.repeat_interleave(nh // ng, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(d)
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            ctx = torch.einsum("hqk,khd->qhd", probs, v.float()).reshape(s, nh * d)
            attn = F.linear(ctx, w[p + "self_attention.dense.weight"])
            h = h + attn
            x = rms(h, w[p + "post_attention_layernorm.weight"], eps)
            gate, up = F.linear(x, w[p + "mlp.dense_h_to_4h.weight"]).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, w[p + "mlp.dense_4h_to_h.weight"])
        h = rms(h, w["transformer.encoder.final_layernorm.weight"], eps)
        return F.linear(h, w["transformer.output_layer.weight"]).float()

    def greedy(self, prompt: list[int], steps: int, eos: set[int]) -> list[int]:
        """Recomputes the whole sequence each step: no cache to get wrong."""
        seq, out = list(prompt), []
        for _ in range(steps):
            t = int(self.logits(seq)[-1].argmax())
            if t in eos:
                break
            out.append(t)
            seq.append(t)
        return out

    def beam(self, prompt: list[int], steps: int, k: int, eos: int, lp: float = 1.0):
        """Beam search run to the full budget: each step ranks the K*V continuations of the
        live beams by summed log-prob; eos continuations ranked ahead of the K-th live one
        become hypotheses scored sum / (tokens incl. eos) ** lp; at the end live beams
        compete at length `steps`. Highest score wins."""
        live = [(0.0, [])]
        finished = []
        for step in range(steps):
            cand = []
            for score, hist in live:
                logp = self.logits(prompt + hist)[-1].log_softmax(-1)
                cand += [(score + float(logp[t]), hist, t) for t in range(logp.numel())]
            cand.sort(key=lambda x: -x[0])
            nxt = []
            for score, hist, t in cand[:2 * k]:
                if t == eos:
                    finished.append((score / (step + 1) ** lp, hist))
                    continue
                nxt.append((score, hist + [t]))
                if len(nxt) == k:
                    break
            live = nxt
        finished += [(s / steps ** lp, h) for s, h in live]
        return max(finished, key=lambda x: x[0])[1]


# ---- tiny checkpoints -------------------------------------------------------------------
TINY = dict(model_type="chatglm", num_layers=2, hidden_size=64, num_attention_heads=4,
            multi_query_attention=True, multi_query_group_num=2, kv_channels=16,
            ffn_hidden_size=96, padded_vocab_size=512, seq_length=256,
            layernorm_epsilon=1e-5, add_qkv_bias=True, add_bias_linear=False, rmsnorm=True,
            post_layer_norm=True, apply_residual_connection_post_layernorm=False,
            tie_word_embeddings=False, original_rope=True, torch_dtype="float32")

MODELING = {  # the lines of each published modeling_chatglm.py that decide rope_ratio
    "base": "        base = base * self.rope_ratio\n",
    "position": "        seq_idx = torch.arange(seq_len, dtype=torch.float, device=device)"
                " / self.rope_ratio\n",
    "none": "        seq_idx = torch.arange(seq_len, dtype=torch.float, device=device)\n",
}


def make_chatglm_dir(path, scaling: str = "base", rope_ratio: float = 1.0, seed: int = 0,
                     tokenizer: str | None = None, name: str = "THUDM/chatglm3-6b",
                     **config):
    """A ChatGLM directory as published: config.json, model.safetensors with random
    weights (biases and norms non-trivial), a modeling_chatglm.py stub carrying the rope
    line of the `scaling` variant, optionally tokenizer.model."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    c = {**TINY, "_name_or_path": name, "rope_ratio": rope_ratio, **config}
    g = torch.Generator().manual_seed(seed)
    nh, d, H = c["num_attention_heads"], c["kv_channels"], c["hidden_size"]
    ng = c["multi_query_group_num"]
    qkv = nh * d + 2 * ng * d

    def r(*shape, scale=0.15):
        return (torch.randn(*shape, generator=g) * scale).contiguous()

    w = {"transformer.embedding.word_embeddings.weight": r(c["padded_vocab_size"], H, scale=1),
         "transformer.encoder.final_layernorm.weight": 1 + r(H, scale=0.2),
         "transformer.output_layer.weight": r(c["padded_vocab_size"], H)}
    for i in range(c["num_layers"]):
        p = L.format(i)
        w[p + "input_layernorm.weight"] = 1 + r(H, scale=0.2)
        w[p + "self_attention.query_key_value.weight"] = r(qkv, H)
        w[p + "self_attention.query_key_value.bias"] = r(qkv, scale=0.3)
        w[p + "self_attention.dense.weight"] = r(H, nh * d)
        w[p + "post_attention_layernorm.weight"] = 1 + r(H, scale=0.2)
        w[p + "mlp.dense_h_to_4h.weight"] = r(2 * c["ffn_hidden_size"], H)
        w[p + "mlp.dense_4h_to_h.weight"] = r(H, c["ffn_hidden_size"])
    save_file(w, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    with open(os.path.join(path, "modeling_chatglm.py"), "w") as f:
        f.write("class RotaryEmbedding:\n    def forward_impl(self, seq_len, n_elem, dtype, "
                "device, base=10000):\n" + MODELING[scaling])
    if tokenizer:
        import shutil
        shutil.copy(tokenizer, os.path.join(path, "tokenizer.model"))
    return path


TEXT = ["The file could not be opened.", "Permission denied", "Save changes before closing?",
        "无法打开文件。", "权限被拒绝", "关闭前保存更改？", "Translate the following English text "
        "into Chinese.", "Translate the following Chinese text into English.",
        "[Round 1]\n\n问：\n\n答：", "error: invalid option -- 'x'", "错误：无效的选项"] * 20


def train_chatglm_sp(out_dir, vocab_size: int = 400) -> str:
    """A sentencepiece model with ChatGLM's layout: <unk>=0, <s>=1, </s>=2, byte fallback,
    no normaliser (ChatGLM keeps newlines: "\\n" is its <0x0A> piece),
    no control symbols of ours (the specials are appended after it, by id)."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_prefix=prefix, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=1, hard_vocab_limit=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    return prefix + ".model"
