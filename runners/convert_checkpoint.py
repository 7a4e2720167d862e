"""Convert checkpoints between the native format and the ChatGLM2/3 / GLM-4 naming
(engine/train/convert_command.py).

    python runners/convert_checkpoint.py --help      # every --convert.field and its default
    python runners/convert_checkpoint.py --convert.direction to_chatglm \
        --convert.checkpoint runs/pretrain/checkpoint --convert.out_dir out/chatglm
"""
from engine.errors import run_main
from engine.train.convert_command import main

if __name__ == "__main__":
    run_main(main)
