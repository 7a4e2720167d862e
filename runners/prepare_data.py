"""Prepare the EN/ZH data: gettext catalogues -> pairs, splits, tokenizer, token shards
(engine/recipe/data/prepare_command.py).

    python runners/prepare_data.py --help      # every --data.field, its default and meaning
    python runners/prepare_data.py --data.dir data
"""
from engine.errors import run_main
from engine.recipe.data.prepare_command import main

if __name__ == "__main__":
    run_main(main)
