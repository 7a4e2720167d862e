"""BLEU / chrF / loss of every kept checkpoint of one or more runs, against training time:
engine/recipe/reports/curve.py.

    python runners/learning_curve.py --help   # every --curve.field, its default and meaning
"""
from engine.errors import run_main
from engine.recipe.reports.curve import main

if __name__ == "__main__":
    run_main(main)
