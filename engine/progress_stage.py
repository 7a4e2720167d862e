"""One stage of `make demo` / `make paper`: a banner, the command, the time it took.

    python -m engine.progress_stage 3/7 "fine-tune the teacher" -- python runners/pretrain.py ...
    python -m engine.progress_stage --since 1796170000 "make demo"   # the total since a time

prints `[3/7] fine-tune the teacher ...` (with the clock time) before the command and
`[3/7] fine-tune the teacher: done in 4m12s` after it; exits with the command's status
(a failed stage says so and how long it ran). Standard library only.

Makefile plumbing, not a user command, so it is a module rather than a runner and keeps
its positional form: its arguments are a banner and a command line to run, nothing a
--section.field config would describe.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from engine.progress import format_duration


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", nargs="?", default="",
                   help="N/TOTAL, e.g. 3/7 (omit with --since)")
    p.add_argument("name", help="what the stage does, one line")
    p.add_argument("--since", type=float, default=None,
                   help="print the time since this unix time for NAME and exit")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- then the command to run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.since is not None:
        print(f"{args.name}: {format_duration(time.time() - args.since)} in all", flush=True)
        return 0
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        raise SystemExit("error: no command given (progress_stage N/TOTAL NAME -- COMMAND ...)")
    head = f"[{args.index}] {args.name}" if args.index else args.name
    print(f"\n{head} ... ({time.strftime('%H:%M:%S')})", flush=True)
    t0 = time.monotonic()
    try:
        code = subprocess.call(cmd)
    except OSError as e:
        raise SystemExit(f"error: {head}: cannot run {cmd[0]}: {e.strerror}") from None
    took = format_duration(time.monotonic() - t0)
    if code:
        print(f"{head}: FAILED (exit code {code}) after {took}", flush=True)
    else:
        print(f"{head}: done in {took}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
