"""Convert checkpoints between the native format and the ChatGLM2/3 / GLM-4 naming:
engine/train/convert.py.

    # a native checkpoint (any tp x pp x dp layout saved it) -> ChatGLM safetensors + config
    python runners/convert_checkpoint.py --to-chatglm runs/pretrain/checkpoint out/chatglm
    # a ChatGLM directory (config.json + *.safetensors [+ index]) -> a native checkpoint
    python runners/convert_checkpoint.py --from-chatglm /models/chatglm3-6b ckpt/chatglm3
"""
from engine.errors import run_main
from engine.train.convert import main

if __name__ == "__main__":
    run_main(main)
