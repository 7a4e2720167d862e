"""Translation quality, loss, size and speed of a checkpoint: engine/recipe/workflows/evaluate.py.

    python runners/evaluate.py --help      # every --section.field, its default and meaning
"""
from engine.errors import run_main
from engine.recipe.workflows.evaluate import main

if __name__ == "__main__":
    run_main(main)
