"""Crash-safe file writes: write a sibling temp file, then rename over the target.

`os.replace` is atomic on POSIX within one filesystem, so a reader (or a crash) sees
either the old file or the new one, never half of each; a failed write deletes the temp
file and leaves the existing target untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from engine.train.file_mode import respect_umask


@contextlib.contextmanager
def staged_path(path: str | os.PathLike):
    """Yield a fresh temp path next to `path` (same filesystem, so os.replace onto `path`
    is atomic); the caller moves it into place. Removed on exit if it is still there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    respect_umask(tmp)   # mkstemp's 0600 would otherwise become the final file's mode
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path next to `path`; on clean exit it replaces `path`."""
    with staged_path(path) as tmp:
        yield tmp
        os.replace(tmp, path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
