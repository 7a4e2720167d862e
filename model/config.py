"""GLMConfig: the one description of a GLM's shape, with named presets.

Field names follow the ChatGLM2/3 configs where one exists (multi_query_group_num,
kv_channels, ffn_hidden_size, padded_vocab_size, rope_ratio) so published config.json
files map across by name.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass
class GLMConfig:
    num_layers: int = 2                 # transformer blocks
    hidden_size: int = 64               # width of the residual stream
    num_attention_heads: int = 4        # query heads per layer
    multi_query_group_num: int = 2      # KV groups; == heads is plain MHA, 1 is MQA
    kv_channels: int = 16               # head dim
    ffn_hidden_size: int = 172          # SwiGLU inner width
    padded_vocab_size: int = 512        # embedding / output rows (the tokenizer's, padded)
    seq_length: int = 128               # longest sequence the rotary cache is built for
    rope_ratio: float = 1.0             # rotary scale factor; how it applies: rope_scaling
    # what rope_ratio scales, as each published model's own code reads it: "base" (rotary
    # base 10000 * rope_ratio: native models, GLM-4, chatglm3-6b-32k), "position"
    # (positions / rope_ratio, base 10000: chatglm2-6b-32k), "none" (ignored: chatglm3-6b)
    rope_scaling: str = "base"
    # "glm2d": GLM blank infilling (bidirectional Part A, 2D positions, the second half of
    # each head rotated by block positions): native checkpoints. "causal1d": causal
    # attention, positions 0..n-1, the second half of each head never rotated: ChatGLM2/3
    # and GLM-4, which were pretrained that way (model/convert.py sets it on import)
    position_layout: str = "glm2d"
    # prompt format of an imported chat model ("chatglm3": <|user|> ... <|assistant|>, also
    # GLM-4's; "chatglm2": [Round 1] 问：... 答：); "" for native and base models
    chat_format: str = ""
    layernorm_epsilon: float = 1e-5     # RMSNorm epsilon
    add_qkv_bias: bool = True           # bias on the fused QKV projection (ChatGLM has one)
    add_bias_linear: bool = False       # bias on the other linear layers
    hidden_dropout: float = 0.0         # residual dropout (embedding, attention, MLP), [0, 1)
    attention_dropout: float = 0.0      # kept for ChatGLM configs; only 0.0 is supported
    init_std: float = 0.02              # std of the normal weight init
    kernels: str = "auto"               # "auto" | "triton" | "torch": see kernels/ops.py

    def __post_init__(self):
        positive = ("num_layers", "hidden_size", "num_attention_heads", "multi_query_group_num",
                    "kv_channels", "ffn_hidden_size", "padded_vocab_size", "seq_length")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.multi_query_group_num:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"multi_query_group_num={self.multi_query_group_num}")
        if self.kv_channels % 4:
            # rotary splits each head in halves (position / block position) and rotates pairs
            raise ValueError(f"kv_channels={self.kv_channels} must be divisible by 4 "
                             "(2D rotary rotates adjacent pairs in each half of the head)")
        if self.rope_ratio <= 0:
            raise ValueError(f"rope_ratio={self.rope_ratio} must be positive")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling={self.rope_scaling!r} must be one of "
                             f"{', '.join(ROPE_SCALINGS)}")
        if self.position_layout not in POSITION_LAYOUTS:
            raise ValueError(f"position_layout={self.position_layout!r} must be one of "
                             f"{', '.join(POSITION_LAYOUTS)}")
        if self.chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format={self.chat_format!r} must be one of "
                             f"{', '.join(repr(f) for f in CHAT_FORMATS)}")
        if self.chat_format and self.position_layout != "causal1d":
            raise ValueError(f"chat_format={self.chat_format!r} needs "
                             "position_layout='causal1d' (ChatGLM chat models are causal)")
        if self.layernorm_epsilon <= 0:
            raise ValueError(f"layernorm_epsilon={self.layernorm_epsilon} must be positive")
        if not 0.0 <= self.hidden_dropout < 1.0:
            raise ValueError(f"hidden_dropout={self.hidden_dropout} must be in [0, 1)")
        if self.attention_dropout != 0.0:
            # kept as a field for ChatGLM configs (which ship 0.0); accepting another value
            # would train silently without it
            raise ValueError(f"attention_dropout={self.attention_dropout} is not supported: "
                             "no attention kernel (fused or torch) applies dropout; use 0.0")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels={self.kernels!r} must be one of 'auto', 'triton', 'torch'")

    # ---- derived sizes and rotary ----------------------------------------------------
    @property
    def causal(self) -> bool:
        return self.position_layout == "causal1d"

    @property
    def rope_base(self) -> float:
        return 10000.0 * self.rope_ratio if self.rope_scaling == "base" else 10000.0

    @property
    def rope_position_scale(self) -> float:
        """Positions are divided by this before the angles (position interpolation)."""
        return self.rope_ratio if self.rope_scaling == "position" else 1.0

    # ---- derived sizes -------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_size(self) -> int:
        return self.multi_query_group_num * self.kv_channels

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    # ---- presets and (de)serialisation ---------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "GLMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GLMConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# fields that describe how the weights were trained rather than their shape: a run that
# starts from a checkpoint must use the checkpoint's values (see with_layout_of)
LAYOUT_FIELDS = ("position_layout", "rope_scaling", "rope_ratio", "chat_format")


def with_layout_of(config: "GLMConfig", checkpoint_model: dict) -> "GLMConfig":
    """The model config of a run that starts from a checkpoint (meta.json's config.model):
    `config` with the checkpoint's LAYOUT_FIELDS (a checkpoint older than a field has its
    default). A causal1d checkpoint (an imported ChatGLM, or anything trained from one)
    gives its whole config, keeping only `config.kernels`: nobody restates a published
    model's shape in a run config."""
    if checkpoint_model.get("position_layout") == "causal1d":
        return GLMConfig.from_dict({**checkpoint_model, "kernels": config.kernels})
    default = GLMConfig()
    return dataclasses.replace(config, **{f: checkpoint_model.get(f, getattr(default, f))
                                          for f in LAYOUT_FIELDS})


def layout_mismatch(config: "GLMConfig", checkpoint_model: dict) -> str | None:
    """A one-line description of the first LAYOUT_FIELDS difference, or None."""
    theirs = with_layout_of(config, checkpoint_model)
    for f in LAYOUT_FIELDS:
        if getattr(config, f) != getattr(theirs, f):
            return (f"model.{f}={getattr(config, f)!r} but the checkpoint was trained with "
                    f"{getattr(theirs, f)!r}")
    return None


ROPE_SCALINGS = ("base", "position", "none")
POSITION_LAYOUTS = ("glm2d", "causal1d")
CHAT_FORMATS = ("", "chatglm2", "chatglm3")

_CHATGLM_6B = dict(num_layers=28, hidden_size=4096, num_attention_heads=32,
                   multi_query_group_num=2, kv_channels=128, ffn_hidden_size=13696,
                   padded_vocab_size=65024, seq_length=32768, layernorm_epsilon=1e-5,
                   position_layout="causal1d")

PRESETS: dict[str, dict] = {
    # < 1M parameters: every unit and distributed test uses this one
    "tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, multi_query_group_num=2,
                 kv_channels=16, ffn_hidden_size=172, padded_vocab_size=1024, seq_length=256),
    # the CPU demo: ~9M parameters, trains in minutes on 2 cores
    "small": dict(num_layers=6, hidden_size=256, num_attention_heads=8, multi_query_group_num=2,
                  kv_channels=32, ffn_hidden_size=688, padded_vocab_size=8192, seq_length=256),
    "base": dict(num_layers=12, hidden_size=768, num_attention_heads=12, multi_query_group_num=4,
                 kv_channels=64, ffn_hidden_size=2048, padded_vocab_size=32000, seq_length=2048),
    "chatglm2-6b": dict(_CHATGLM_6B),
    "chatglm3-6b": dict(_CHATGLM_6B, seq_length=8192),
    "glm4-9b": dict(num_layers=40, hidden_size=4096, num_attention_heads=32,
                    multi_query_group_num=2, kv_channels=128, ffn_hidden_size=13696,
                    padded_vocab_size=151552, seq_length=131072, rope_ratio=500.0,
                    layernorm_epsilon=1.5625e-07, position_layout="causal1d"),
}
