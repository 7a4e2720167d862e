"""The ahead-of-time kernel check (runners/check_kernels.py, kernels/aot_check.py) on a
representative subset: the launches that used to spill (dK/dV at head_dim 128 on sm_80,
unpacked and packed rows, fp32 attention tiles), the fused FFN GEMM on both targets, compiled for real (triton +
ptxas, no GPU). `make check-kernels` runs the whole sweep.

The check must run without the interpreter, so everything here is a subprocess."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "runners", "check_kernels.py")
pytest.importorskip("triton")


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(args, timeout=170):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _rows(out: str):
    """Table rows as dicts keyed by the header's columns."""
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[1:]]


def test_picked_tiles_pass_on_both_targets():
    res = _run([RUNNER, "--check.archs", "80,90", "--check.models", "chatglm3-6b",
                "--check.dtypes", "bf16", "--check.kernels", "_attn_bwd_dkdv,_swiglu_matmul"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _rows(res.stdout)
    seen = {(r["kernel"], r["target"]) for r in rows}
    assert seen == {(k, t) for k in ("_attn_bwd_dkdv", "_swiglu_matmul")
                    for t in ("sm_80", "sm_90")}, seen
    for r in rows:
        assert r["spill B"] == "0" and r["ok"] == "ok", r
        assert r["tensor cores"] in ("mma.sync", "wgmma"), r
        shared, limit = r["shared B (limit)"].replace(",", "").replace(")", "").split(" (")
        assert 0 < int(shared) <= int(limit), r
    # packed rows (document masking, PACKED=True) are a separate specialisation: swept too
    packed = {r["target"] for r in rows
              if r["kernel"] == "_attn_bwd_dkdv" and r["config"].endswith(" PACKED")}
    assert packed == {"sm_80", "sm_90"}, rows
    # the fused FFN's GEMM at bf16 on H100/H200 is a warpgroup MMA
    assert any(r["kernel"] == "_swiglu_matmul" and r["target"] == "sm_90"
               and r["tensor cores"] == "wgmma" for r in rows)


def test_fp32_attention_tiles_do_not_spill():
    res = _run([RUNNER, "--check.archs", "80", "--check.models", "chatglm3-6b",
                "--check.dtypes", "fp32", "--check.kernels", "_attn_fwd"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _rows(res.stdout)
    # training (sq 4096), decoding (sq 1) and packed-row training tiles
    assert len(rows) == 3 and sum(r["config"].endswith(" PACKED") for r in rows) == 1, rows
    assert all(r["spill B"] == "0" and r["tensor cores"] == "-" for r in rows), rows


def test_a_spilling_tile_fails_the_check():
    # the dK/dV tile the launcher used to pick at head_dim 128 on sm_80
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "from kernels import aot_check, flash_attention as fa\n"
        "fa.TILES[(80, 128, '16', 'dkdv')] = fa.Blocks(32, 128, 8, 3)\n"
        "rs = aot_check.run_check([80], ['chatglm3-6b'], ['bf16'], kernels=['_attn_bwd_dkdv'],"
        " log=lambda *a: None)\n"
        "print([p for r in rs for p in r.problems])\n")
    res = _run(["-c", code])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "spills" in res.stdout, res.stdout


def test_problems_name_each_failure():
    sys.path.insert(0, ROOT)
    from kernels.aot_check import Result
    ok = Result("_k", 80, "", "bf16", 1000, 128, 0, "mma.sync", 0.0, [])
    assert ok.problems == []
    bad = Result("_k", 80, "", "bf16", 200_000, 255, 64, "fma", 0.0, [])
    assert bad.problems == ["spills 64 B", "shared 200000 B > 166912 B",
                            "16-bit dots miss the tensor cores"]
    assert Result("_k", 90, "", "bf16", 0, 0, 0, "-", 0.0, [], error="x").problems == ["x"]
