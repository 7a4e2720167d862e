"""Knowledge distillation of a student against a frozen teacher: engine/recipe/workflows/distill.py.

    python runners/distill.py --help      # every --section.field, its default and meaning
"""
from engine.errors import run_main
from engine.recipe.workflows.distill import main

if __name__ == "__main__":
    run_main(main, graceful_stop=True)
