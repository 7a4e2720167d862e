"""Mixed-language fine-tuning of a teacher, continued distillation of its student (paper
Algorithm 3): engine/recipe/workflows/finetune.py.

    python runners/finetune.py --help      # every --section.field, its default and meaning
"""
from engine.errors import run_main
from engine.recipe.workflows.finetune import main

if __name__ == "__main__":
    run_main(main, graceful_stop=True)
