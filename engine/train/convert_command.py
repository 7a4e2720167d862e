"""runners/convert_checkpoint.py: convert checkpoints between the native format and the
ChatGLM2/3 / GLM-4 naming (engine/train/convert.py).

    # a native checkpoint (any tp x pp x dp layout saved it) -> ChatGLM safetensors + config
    python runners/convert_checkpoint.py --convert.direction to_chatglm \
        --convert.checkpoint runs/pretrain/checkpoint --convert.out_dir out/chatglm
    # a ChatGLM directory (config.json + *.safetensors [+ index]) -> a native checkpoint
    python runners/convert_checkpoint.py --convert.direction from_chatglm \
        --convert.checkpoint /models/chatglm3-6b --convert.out_dir ckpt/chatglm3
    python runners/pretrain.py --config ... --train.init_from ckpt/chatglm3"""
from __future__ import annotations

from dataclasses import dataclass

from engine.config_cli import Alias, command

DIRECTIONS = ("to_chatglm", "from_chatglm")


@dataclass
class ConvertConfig:
    direction: str = ""            # to_chatglm (native -> ChatGLM) | from_chatglm (required)
    checkpoint: str = ""           # the directory to convert (required)
    out_dir: str = ""              # the directory to write (required)
    dtype: str = ""                # float32 | float16 | bfloat16 ("": the stored dtype, bit
    #                                for bit)
    max_shard_gb: float = 2.0      # largest safetensors file to write, GiB
    # from_chatglm: what rope_ratio scales, base | position | none ("": read from the
    # directory's modeling_chatglm.py, else its name, else base)
    rope_scaling: str | None = ""
    # from_chatglm: prompt format of a chat model, chatglm3 | chatglm2 | none ("": from
    # its name; none for base models)
    chat_format: str | None = ""

    def __post_init__(self):
        from engine.train.convert import DTYPES
        if self.direction not in DIRECTIONS:
            raise ValueError(f"convert.direction={self.direction!r} must be to_chatglm or "
                             "from_chatglm")
        if not self.checkpoint or not self.out_dir:
            raise ValueError("convert.checkpoint and convert.out_dir are required")
        if self.dtype and self.dtype not in DTYPES:
            raise ValueError(f"convert.dtype={self.dtype!r} must be one of "
                             f"{', '.join(sorted(DTYPES))}")
        if not self.max_shard_gb > 0:
            raise ValueError(f"convert.max_shard_gb={self.max_shard_gb} must be positive")
        # the command line reads a bare `none` as null: the same choice here
        if self.rope_scaling not in ("", "base", "position", "none", None):
            raise ValueError(f"convert.rope_scaling={self.rope_scaling!r} must be base, "
                             "position or none")
        if self.chat_format not in ("", "chatglm3", "chatglm2", "none", None):
            raise ValueError(f"convert.chat_format={self.chat_format!r} must be chatglm3, "
                             "chatglm2 or none")


COMMAND = command(
    __doc__, {"convert": ConvertConfig},
    flags={"--force": "replace an existing convert.out_dir"},
    aliases={"--to-chatglm": Alias("convert.checkpoint", more=("convert.out_dir",),
                                   sets={"convert.direction": "to_chatglm"}),
             "--from-chatglm": Alias("convert.checkpoint", more=("convert.out_dir",),
                                     sets={"convert.direction": "from_chatglm"}),
             "--dtype": Alias("convert.dtype"), "--max-shard-gb": Alias("convert.max_shard_gb"),
             "--overwrite": Alias("--force"), "--rope-scaling": Alias("convert.rope_scaling"),
             "--chat-format": Alias("convert.chat_format")})


def run(config, force: bool = False):
    from engine.train import checkpoint as ckpt_lib
    from engine.train.convert import DTYPES, from_chatglm, to_chatglm
    c = config.convert
    dtype = DTYPES[c.dtype] if c.dtype else None
    try:
        if c.direction == "to_chatglm":
            files = to_chatglm(c.checkpoint, c.out_dir, dtype, c.max_shard_gb, force)
            print(f"wrote {c.out_dir}: {len(files)} safetensors file(s), config.json, index")
            return
        over = {}
        if c.rope_scaling != "":
            over["rope_scaling"] = c.rope_scaling or "none"
        if c.chat_format != "":
            over["chat_format"] = "" if c.chat_format in ("none", None) else c.chat_format
        from_chatglm(c.checkpoint, c.out_dir, dtype, c.max_shard_gb, force, **over)
    except OSError as e:         # a file the OS refused: one line, never a traceback
        raise ValueError(str(e)) from None
    m = ckpt_lib.Checkpoint(c.out_dir).meta["config"]["model"]
    print(f"wrote {c.out_dir}: native checkpoint at step 0 (use --train.init_from "
          f"{c.out_dir}); position_layout={m['position_layout']} rope_ratio="
          f"{m['rope_ratio']} rope_scaling={m['rope_scaling']} chat_format="
          f"{m['chat_format'] or 'none'}")


def main(argv=None):
    return COMMAND.main(run, argv)
