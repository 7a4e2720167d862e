"""Train a GLM (pretraining or translation fine-tuning): engine/recipe/workflows/pretrain.py.

    python runners/pretrain.py --help      # every --section.field, its default and meaning
"""
from engine.errors import run_main
from engine.recipe.workflows.pretrain import main

if __name__ == "__main__":
    run_main(main, graceful_stop=True)
