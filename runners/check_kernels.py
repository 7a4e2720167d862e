"""Compile every Triton kernel ahead of time for A100 (sm_80) and H100/H200 (sm_90), with
the tiles its launcher picks for ChatGLM3-6B / GLM-4-9B shapes, and check each launch's
shared memory, registers / spills and tensor-core use (kernels/aot_check.py). No GPU
needed; exits 1 if any picked launch spills, exceeds shared memory or misses tensor cores.

    python runners/check_kernels.py                         # the whole sweep (make check-kernels)
    python runners/check_kernels.py --arch 80 --ops attention --dtypes bf16 --models glm4-9b
    python runners/check_kernels.py --out kernel_check.md   # also write the table
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # real JIT kernels: must precede importing triton

from kernels import aot_check  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", choices=sorted(aot_check.TARGETS),
                   default=sorted(aot_check.TARGETS), help="compute capabilities to compile for")
    p.add_argument("--models", nargs="+", choices=sorted(aot_check.MODELS),
                   default=sorted(aot_check.MODELS), help="model shapes")
    p.add_argument("--dtypes", nargs="+", choices=sorted(aot_check.DTYPES),
                   default=sorted(aot_check.DTYPES), help="activation dtypes")
    p.add_argument("--ops", nargs="+", choices=aot_check.OPS, default=None,
                   help="only these ops' kernels (default: all)")
    p.add_argument("--kernels", nargs="+", metavar="NAME", default=None,
                   help="only these @triton.jit kernels, e.g. _attn_bwd_dkdv (default: all)")
    p.add_argument("--out", help="write the markdown table here as well")
    args = p.parse_args(argv)
    results = aot_check.run_check(args.arch, args.models, args.dtypes, args.ops,
                                  args.kernels)
    text = aot_check.table(results)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    bad = [r for r in results if r.problems]
    print(f"\n{len(results)} launches compiled, {len(bad)} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
