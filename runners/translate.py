"""Translate English to Chinese with any checkpoint: one sentence a line, Chinese out
(engine/recipe/translate.py).

    python runners/translate.py --help      # every --translate.field, its default and meaning
    python runners/translate.py --translate.checkpoint runs/demo/translate "File not found"
    python runners/translate.py --translate.checkpoint CKPT --interactive
"""
from engine.errors import run_main
from engine.recipe.translate import main

if __name__ == "__main__":
    run_main(main)
