"""A schedule's simulated time line as a PNG: one row per rank, time left to right,
forwards blue, backwards green (input gradients only in the split schedules), weight
gradients orange, idle white; microbatches alternate two shades so neighbours stay
apart. Written with zlib alone (no plotting library needed)."""
from __future__ import annotations

import struct
import zlib

COLORS = {"F": ((66, 114, 196), (120, 160, 230)), "B": ((60, 150, 80), (120, 200, 130)),
          "W": ((230, 140, 40), (250, 190, 110))}
IDLE, GRID = (255, 255, 255), (200, 200, 200)


def draw_png(result, path: str, unit_px: int = 24, row_px: int = 28, gap_px: int = 4):
    """Write `result` (pipeline_sim.SimResult) to `path`; unit_px pixels per unit time."""
    p = len(result.timeline)
    width = max(1, int(round(result.makespan * unit_px)))
    height = p * (row_px + gap_px) + gap_px
    img = [[GRID] * width for _ in range(height)]
    for s, ops in enumerate(result.timeline):
        top = gap_px + s * (row_px + gap_px)
        for y in range(top, top + row_px):
            img[y] = [IDLE] * width
        for kind, mb, chunk, start, end in ops:
            color = COLORS[kind][(mb + chunk) % 2]
            x0, x1 = int(round(start * unit_px)), int(round(end * unit_px))
            for y in range(top, top + row_px):
                row = img[y]
                for x in range(x0, min(x1, width)):
                    # a 1-pixel white edge between ops
                    row[x] = IDLE if x == x1 - 1 else color
    _write_png(path, img)


def _write_png(path: str, img):
    height, width = len(img), len(img[0])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in img)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))
