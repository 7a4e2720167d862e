"""Files we write land with the mode a plain open() would give them (0666 & ~umask).

tempfile.mkstemp and safetensors' save_file create files 0600, so without this a checkpoint's
weights and a data dir's files were private while meta.json next to them was group-readable."""
from __future__ import annotations

import os


def current_umask() -> int:
    # /proc avoids os.umask's set-and-restore, which would briefly change it for other threads
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(path: str | os.PathLike) -> None:
    os.chmod(path, 0o666 & ~current_umask())
