"""GPU check (4): the engine under `torchrun --nproc_per_node 1`: its NCCL process group
(gloo on a machine without CUDA), the dp/ZeRO collectives, a few trainer steps.

    python -m torch.distributed.run --nproc_per_node 1 -m engine.gpu_check.nccl OUT.json
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time

import torch

from engine.gpu_check.training import Patterns

def nccl_command(path: str, port) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "engine.gpu_check.nccl", path]


def section_nccl(plan, device, peaks, log) -> dict:
    path = os.path.abspath(os.path.join(plan.out_dir, "nccl.json"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = nccl_command(path, port)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=plan.nccl_timeout_s)
    out = {"command": " ".join(cmd), "returncode": proc.returncode,
           "seconds": round(time.monotonic() - t0, 1),
           "output_tail": (proc.stdout + proc.stderr)[-3000:]}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            out["worker"] = json.load(f)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return out


def nccl_worker(path: str):
    """Runs under torchrun (one process): the engine's NCCL group, its collectives and
    a few trainer steps with a ParallelState."""
    import torch.distributed as dist
    from engine.config import build_run_config
    from engine.optim import collectives
    from engine.parallel.failures import wait_all
    from engine.parallel.state import ParallelDims, init_distributed
    from engine.timing import synchronize
    from engine.train.trainer import Trainer
    result = {}
    state = init_distributed(ParallelDims(), timeout=120, num_layers=2)
    try:
        result["backend"] = dist.get_backend()
        result["device"] = str(state.device)
        x = torch.arange(8, dtype=torch.float32, device=state.device)
        work = dist.all_reduce(x, async_op=True)
        wait_all([work], state, "all_reduce", [[0]])
        out = torch.empty(8, device=state.device)
        collectives.reduce_scatter(out, x, dist.group.WORLD).wait()
        got = torch.empty(8, device=state.device)
        collectives.all_gather(got, out, dist.group.WORLD).wait()
        synchronize(state.device)
        result["collectives_ok"] = bool(torch.equal(got.cpu(), torch.arange(8.0)))
        cfg = build_run_config({
            "model": {"preset": "tiny"}, "parallel": {"zero_stage": 2},
            "train": {"steps": 5, "micro_batch_size": 4, "num_microbatches": 2,
                      "seq_len": 128, "warmup_steps": 1, "log_every": 1, "eval_every": 0,
                      "out_dir": os.path.join(os.path.dirname(path), "nccl_run")}})
        lines = []
        hist = Trainer.from_config(cfg, Patterns(128), state=state, log=lines.append).fit()
        result.update(steps=len(hist), losses=[round(h.loss, 4) for h in hist],
                      log=lines[-2:], finite=all(math.isfinite(h.loss) for h in hist))
        dist.barrier()
        result["ok"] = result["collectives_ok"] and result["finite"]
    finally:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        dist.destroy_process_group()


if __name__ == "__main__":
    nccl_worker(sys.argv[1])
