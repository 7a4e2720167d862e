"""The paper's tables and figures at small scale on CPU (engine/recipe/reports/command.py).

    python runners/report.py --help      # every --section.field, its default and meaning
    python runners/report.py --report.pretrained runs/demo/pretrain/checkpoint
    python runners/report.py --report.quick true     # smoke run, about a minute
"""
from engine.errors import run_main
from engine.recipe.reports.command import main

if __name__ == "__main__":
    run_main(main)
