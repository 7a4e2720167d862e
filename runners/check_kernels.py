"""Compile every Triton kernel ahead of time for A100 (sm_80) and H100/H200 (sm_90), with
the tiles its launcher picks for ChatGLM3-6B / GLM-4-9B shapes, and check each launch's
shared memory, registers / spills and tensor-core use (kernels/aot_check.py). No GPU
needed; exits 1 if any picked launch spills, exceeds shared memory or misses tensor cores.

    python runners/check_kernels.py                         # the whole sweep (make check-kernels)
    python runners/check_kernels.py --check.archs 80 --check.ops attention \
        --check.dtypes bf16 --check.models glm4-9b
    python runners/check_kernels.py --check.out_file kernel_check.md   # also write the table
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)  # real JIT kernels: must precede importing triton

from engine.config_cli import Alias, command  # noqa: E402
from engine.errors import run_main  # noqa: E402
from kernels import aot_check  # noqa: E402


@dataclass
class CheckConfig:
    archs: list[int] = field(default_factory=lambda: sorted(aot_check.TARGETS))  # compute
    #                                capabilities to compile for
    models: list[str] = field(default_factory=lambda: sorted(aot_check.MODELS))  # model shapes
    dtypes: list[str] = field(default_factory=lambda: sorted(aot_check.DTYPES))  # activation
    #                                dtypes
    ops: list[str] = field(default_factory=list)  # only these ops' kernels ([]: all)
    kernels: list[str] = field(default_factory=list)  # only these @triton.jit kernels, e.g.
    #                                _attn_bwd_dkdv ([]: all)
    out_file: str = ""             # also write the markdown table here

    def __post_init__(self):
        for name, known in (("archs", aot_check.TARGETS), ("models", aot_check.MODELS),
                            ("dtypes", aot_check.DTYPES), ("ops", aot_check.OPS)):
            bad = [v for v in getattr(self, name) if v not in known]
            if bad:
                raise ValueError(f"check.{name}: unknown {bad[0]!r}; known: "
                                 f"{', '.join(str(k) for k in sorted(known))}")


COMMAND = command(__doc__, {"check": CheckConfig}, aliases={
    "--arch": Alias("check.archs", many=True), "--models": Alias("check.models", many=True),
    "--dtypes": Alias("check.dtypes", many=True), "--ops": Alias("check.ops", many=True),
    "--kernels": Alias("check.kernels", many=True), "--out": Alias("check.out_file")})


def run(config) -> int:
    c = config.check
    results = aot_check.run_check(c.archs, c.models, c.dtypes, c.ops or None,
                                  c.kernels or None)
    text = aot_check.table(results)
    print(text)
    if c.out_file:
        with open(c.out_file, "w") as fh:
            fh.write(text + "\n")
    bad = [r for r in results if r.problems]
    print(f"\n{len(results)} launches compiled, {len(bad)} failing")
    return 1 if bad else 0


def main(argv=None) -> int:
    return COMMAND.main(run, argv)


if __name__ == "__main__":
    run_main(main)
