"""Named fault points for tests: deterministic crashes at a chosen phase of a save
instead of racing a timer.

    ENGINE_FAULT=save:renamed python runners/pretrain.py ...   # dies there, exit 86

In-process tests monkeypatch `point` to raise instead. Production runs never set the
variable, and the check is one dict lookup per phase of a save.
"""
from __future__ import annotations

import os

EXIT_CODE = 86


def point(name: str) -> None:
    """Die at once (no cleanup handlers, no flushing: as kill -9 would) when the
    ENGINE_FAULT environment variable names this point."""
    if os.environ.get("ENGINE_FAULT") == name:
        os._exit(EXIT_CODE)
