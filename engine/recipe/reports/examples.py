"""Example translations side by side: the same seeded sample of rows from two or more
hyps.tsv files (english<TAB>reference<TAB>hypothesis, written by evaluate's
--eval.save_hyps), as one markdown table. `make demo` prints it last; the README's table
of ten examples is that output.

    python -m engine.recipe.reports.examples teacher=runs/demo/eval/hyps.tsv \
        student=runs/demo/eval_student/hyps.tsv [-n 10] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import sys


def read_hyps(path: str) -> list[tuple[str, str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise ValueError(f"{path}:{i}: expected english<TAB>reference<TAB>hypothesis")
            rows.append((parts[0], parts[1], parts[2]))
    return rows


def table(named: dict[str, str], n: int = 10, seed: int = 0) -> str:
    """named: {column name: hyps.tsv}; every file must list the same pairs in order."""
    files = {name: read_hyps(path) for name, path in named.items()}
    first = next(iter(files.values()))
    for name, rows in files.items():
        if [r[:2] for r in rows] != [r[:2] for r in first]:
            raise ValueError(f"{named[name]} does not list the same pairs as "
                             f"{next(iter(named.values()))}")
    pick = sorted(random.Random(seed).sample(range(len(first)), min(n, len(first))))
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731 - a pipe would split the cell
    head = "| English | reference | " + " | ".join(files) + " |"
    lines = [head, "|" + "---|" * (2 + len(files))]
    for i in pick:
        en, ref, _ = first[i]
        lines.append(f"| {esc(en)} | {esc(ref)} | "
                     + " | ".join(esc(rows[i][2]) for rows in files.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="NAME=HYPS_TSV")
    p.add_argument("-n", type=int, default=10, help="rows (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    args = p.parse_args(argv)
    named = {}
    for item in args.files:
        name, eq, path = item.partition("=")
        if not eq:
            p.error(f"{item!r}: expected NAME=HYPS_TSV")
        named[name] = path
    try:
        print(table(named, args.n, args.seed))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
