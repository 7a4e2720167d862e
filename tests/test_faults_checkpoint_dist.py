"""The checkpoint guarantees under two ranks (pp=2, gloo): managed saves write both
stages' files into one step directory, a refusal from rank 0 reaches every rank as the
same one-line error, and a write that fails on one rank (a full disk) stops every rank at
the same point with the partial files removed, the earlier checkpoints untouched."""
import errno
import os

from dist import run_workers


def _worker(rank, world, out_dir):
    from engine.train import checkpoint as ckpt_lib
    from engine.config import build_run_config
    from engine.parallel.state import model_parallel_group
    from engine.parallel.state import ParallelDims, init_distributed
    from engine.train.run_dir import open_run_dir
    from engine.train.trainer import Trainer
    from test_faults_checkpoint import snapshot
    from test_trainer import RandomTokens

    cfg = build_run_config({
        "model": {"preset": "tiny"}, "parallel": {"pp": 2},
        "train": {"steps": 4, "micro_batch_size": 2, "num_microbatches": 2, "seq_len": 16,
                  "warmup_steps": 1, "eval_every": 0, "save_every": 2, "out_dir": out_dir}})
    state = init_distributed(ParallelDims(pp=2), timeout=60, num_layers=4)
    out = {}
    run = open_run_dir(out_dir, state=state, log=lambda *_: None)
    tr = Trainer.from_config(cfg, RandomTokens(16), state=state, log=lambda *_: None,
                             mp_group=model_parallel_group(state))
    tr.fit()
    out["final"] = tr.save()
    run.close()
    before = snapshot(out_dir) if rank == 0 else None
    # a fresh run on it: rank 0 decides, every rank raises its error
    try:
        open_run_dir(out_dir, state=state, log=lambda *_: None)
        out["refusal"] = None
    except ValueError as e:
        out["refusal"] = str(e)
    # rank 1's disk fills up while it writes its stage
    run = open_run_dir(out_dir, resume=True, state=state, log=lambda *_: None)
    tr.step += 1                                   # a new step to save (weights unchanged)
    if rank == 1:
        def full(tensors, dest):
            open(dest, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dest)
        ckpt_lib.save_file = full
    try:
        tr.save()
        out["disk_full"] = None
    except ckpt_lib.CheckpointError as e:
        out["disk_full"] = str(e)
    run.close()
    if rank == 0:
        out["kept"] = snapshot(out_dir) == before
        out["tmp_left"] = [n for n in os.listdir(os.path.join(out_dir, "checkpoints"))
                           if n.endswith(".tmp")]
    return out


def test_two_ranks_save_refuse_and_fail_together(tmp_path):
    out_dir = str(tmp_path / "run")
    res = run_workers(_worker, 2, out_dir, timeout=180)
    assert res[0]["final"] == res[1]["final"] == os.path.join(out_dir, "checkpoints",
                                                              "step_000004")
    files = sorted(os.listdir(os.path.join(out_dir, "checkpoint", "model")))
    assert files == ["stage0.safetensors", "stage1.safetensors"]
    assert res[0]["refusal"] == res[1]["refusal"] and "already holds" in res[0]["refusal"]
    assert res[0]["disk_full"] == res[1]["disk_full"]
    assert "rank 1" in res[0]["disk_full"] and "No space left" in res[0]["disk_full"]
    assert res[0]["kept"] and res[0]["tmp_left"] == []
