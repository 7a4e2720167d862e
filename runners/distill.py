"""Knowledge distillation of a student against a frozen teacher, any tp x pp x dp layout:
engine/recipe/workflows/distill.py.

    python runners/distill.py --help      # every --section.field, its default and meaning
    torchrun --nproc_per_node 4 runners/distill.py ... --parallel.tp 2 --parallel.pp 2
"""
from engine.errors import run_main
from engine.recipe.workflows.distill import main

if __name__ == "__main__":
    run_main(main, graceful_stop=True)
