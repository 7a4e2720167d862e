"""docs/config.md is the generated configuration reference: it must equal what the
generator writes now, and every field must have a line of help."""
import dataclasses
import os

from engine.config_cli import field_help
from engine.recipe.workflows.reference import RUNNERS, markdown

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "config.md")


def test_docs_config_md_is_up_to_date():
    with open(DOC, encoding="utf-8") as f:
        assert f.read() == markdown(), ("docs/config.md is stale: run "
                                        "python -m engine.recipe.workflows.reference "
                                        "> docs/config.md")


def test_every_listed_field_has_help():
    missing = [f"{name}.{f.name}" for module in RUNNERS.values()
               for name, cls in module.COMMAND.sections.items()
               for f in dataclasses.fields(cls) if not field_help(cls).get(f.name)]
    assert not missing, missing
    text = markdown()
    assert "`--train.steps`" in text and "`--prune.teacher`" in text
