"""Check the layout planner against layouts that run on this machine (gloo, one process
per rank): measured memory and step time beside the predictions
(engine/planner/validate_command.py).

    python runners/validate_planner.py --help      # every --section.field and its default
    python runners/validate_planner.py --validate.layouts single,dp2-z1,pp2-dp2
"""
from engine.errors import run_main
from engine.planner.validate_command import main

if __name__ == "__main__":
    run_main(main)
