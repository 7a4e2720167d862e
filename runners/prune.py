"""Structured pruning of a checkpoint into a smaller student: engine/recipe/workflows/prune.py.

    python runners/prune.py --help      # every --section.field, its default and meaning
"""
from engine.errors import run_main
from engine.recipe.workflows.prune import main

if __name__ == "__main__":
    run_main(main)
