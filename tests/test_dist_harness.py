import pytest
import torch
import torch.distributed as dist

from dist import run_workers


def _allreduce(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _raise_on_one(rank, world):
    if rank == 1:
        raise RuntimeError("boom on purpose")
    return rank


def test_workers_all_reduce():
    assert run_workers(_allreduce, 2, timeout=60) == [3.0, 3.0]


def test_worker_failure_names_rank():
    with pytest.raises(AssertionError, match="rank 1 failed"):
        run_workers(_raise_on_one, 2, timeout=60)
