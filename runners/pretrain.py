"""Train a GLM (pretraining or translation fine-tuning), one process or under torchrun:
engine/recipe/workflows/pretrain.py.

    python runners/pretrain.py --help      # every --section.field, its default and meaning
    python runners/pretrain.py --config configs/demo_pretrain.json --train.steps 50
    torchrun --nproc_per_node 2 runners/pretrain.py --config configs/demo_pretrain.json \
        --parallel.pp 2
"""
from engine.errors import run_main
from engine.recipe.workflows.pretrain import main

if __name__ == "__main__":
    run_main(main, graceful_stop=True)
