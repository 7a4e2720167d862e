"""runners/gpu_check.py without a GPU: --dry-run prints the plan and exits 0, a real run
says in one line that it needs CUDA, the NCCL-path worker runs under torchrun (gloo on
CPU), and the markdown records a failed section next to the ones that ran."""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine import gpu_check
from engine.gpu_check.nccl import section_nccl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runner(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "runners", "gpu_check.py"),
                           *args], capture_output=True, text=True, env=env, timeout=120,
                          cwd=ROOT)


def test_dry_run_prints_every_section_and_exits_0(tmp_path):
    proc = _runner("--dry-run", "--gpu_check.out_dir", str(tmp_path / "gc"))
    assert proc.returncode == 0, proc.stderr
    for section in gpu_check.SECTIONS:
        assert f"{section:8s}:" in proc.stdout, proc.stdout
    assert "torch.distributed.run" in proc.stdout and "--nproc_per_node 1" in proc.stdout
    assert not (tmp_path / "gc").exists()         # a dry run writes nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_it_says_so_in_one_line(tmp_path):
    proc = _runner("--gpu_check.out_dir", str(tmp_path / "gc"), "--gpu_check.sections",
                   "kernels")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("gpu_check: the GPU check needs a CUDA device (use "
                                   "--dry-run to see the plan)")


def test_bad_section_is_rejected():
    with pytest.raises(ValueError, match="gpu_check.sections"):
        gpu_check.Plan(sections=("kernels", "bogus"))


def test_nccl_section_runs_the_engine_under_torchrun(tmp_path):
    plan = gpu_check.Plan(out_dir=str(tmp_path), nccl_timeout_s=180)
    out = section_nccl(plan, torch.device("cpu"), {}, lambda *a: None)
    w = out["worker"]
    assert out["returncode"] == 0 and w["ok"], out["output_tail"]
    assert w["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert w["steps"] == 5 and w["collectives_ok"]


def test_markdown_records_a_failed_section_beside_the_others():
    report = {"env": {"device": "NVIDIA H200"}, "peaks": {"flops": 989e12, "source": "h200"},
              "sections": {
                  "kernels": {"ok": True, "seconds": 3.0, "passed": 1, "failed": 0,
                              "rows": [{"op": "rms_norm", "dtype": "bfloat16", "ok": True,
                                        "kernel_rel_err": [0.004], "torch_rel_err": [0.004]}]},
                  "training": {"ok": False, "seconds": 1.0, "error": "RuntimeError: boom"}}}
    md = gpu_check.markdown(report)
    assert "## kernels: ok" in md and "| rms_norm | bfloat16 | yes |" in md
    assert "## training: FAILED" in md and "RuntimeError: boom" in md
    json.dumps(report)
