"""The data-parallel collectives are the tensor forms, one call per bucket: ZeRO 2 reduces
each bucket with one reduce_scatter_tensor into the owners' equal slices, and ZeRO 1/2
gather the parameters with one all_gather_into_tensor per bucket (dp=2 and dp=3, gloo).
Numerics are the dp parity tests' job (test_dp_parity.py); here: which calls, how many,
and that the per-bucket sharding still agrees with ZeRO 0 and saves loadable shards."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

import engine.optim.collectives as collectives
from dist import run_workers
from engine.optim import DistributedOptimizer, FlatLayout, OptimConfig, merge_shards


def test_layout_gives_every_rank_an_equal_slice_of_every_bucket():
    shapes = [("a", (5, 7)), ("b", (3,)), ("c", (11, 4)), ("d", (100,)), ("e", (2, 2))]
    lay = FlatLayout(shapes, bucket_numel=64, shard_world=3, align=16)
    assert len(lay.buckets) >= 3
    for b, span in enumerate(lay.buckets):
        assert span.size % (3 * 16) == 0
        assert [hi - lo for _, lo, hi in lay.bucket_owners(b)] == [span.size // 3] * 3
    for r in range(3):
        flat = lay.shard_flat_ranges(r)
        assert [lo for lo, _, _ in flat] == [s.start + r * (s.size // 3) for s in lay.buckets]
        assert sum(hi - lo for lo, hi, _ in flat) == lay.shard_size
    # one shard: the old single flat range, bit-identical offsets
    one = FlatLayout(shapes, bucket_numel=64, shard_world=1, align=16)
    assert one.shard_flat_ranges(0) == [(s.start, s.end, s.start) for s in one.buckets]


def _toy():
    torch.manual_seed(0)
    return nn.ModuleDict({"emb": nn.Embedding(37, 5), "fc": nn.Linear(5, 7),
                          "norm": nn.LayerNorm(7), "head": nn.Linear(7, 3, bias=False)})


def _counting(monkeypatch_calls):
    def wrap(name, fn):
        def counted(*a, **k):
            monkeypatch_calls[name] = monkeypatch_calls.get(name, 0) + 1
            return fn(*a, **k)
        return counted
    return wrap


def _worker(rank, world):
    calls: dict[str, int] = {}
    wrap = _counting(calls)
    collectives._reduce_scatter = wrap("reduce_scatter", collectives._reduce_scatter)
    collectives._all_gather = wrap("all_gather_tensor", collectives._all_gather)
    for name in ("all_gather", "reduce", "all_reduce"):
        setattr(dist, name, wrap(name, getattr(dist, name)))
    out = {}
    for zero in (0, 1, 2):
        for precision in ("fp32", "bf16"):
            calls.clear()
            model = _toy()
            cfg = OptimConfig(lr=1e-2, zero_stage=zero, precision=precision,
                              bucket_mb=100 * 4 / 2 ** 20)
            opt = DistributedOptimizer(model, cfg, dp_group=dist.group.WORLD)
            g = torch.Generator().manual_seed(rank)
            for _ in range(2):
                x = torch.randint(0, 37, (4,), generator=g)
                model["head"](model["norm"](model["fc"](model["emb"](x)))).float().square() \
                    .mean().backward()
                opt.step()
            out[zero, precision] = {
                "calls": dict(calls), "buckets": len(opt.layout.buckets),
                "params": {n: p.detach().float().clone() for n, p in model.named_parameters()},
                "shard": opt.state_dict(), "full": opt.full_state()}
    return out


@pytest.fixture(scope="module", params=[2, 3])
def runs(request):
    return request.param, run_workers(_worker, request.param, timeout=120)


def test_one_tensor_collective_per_bucket(runs):
    world, results = runs
    for res in results:
        for (zero, precision), r in res.items():
            c, nb = r["calls"], r["buckets"]
            assert nb > 1
            assert c.get("reduce", 0) == 0 and c.get("all_gather", 0) == 0, (zero, c)
            if zero == 2:
                assert c["reduce_scatter"] == 2 * nb, c      # 2 steps
            else:
                assert c.get("reduce_scatter", 0) == 0
            # ZeRO 1/2: one parameter gather per bucket and step
            assert c.get("all_gather_tensor", 0) == (0 if zero == 0 else 2 * nb), (zero, c)


def test_bucket_sharding_matches_zero0_and_saves_mergeable_shards(runs):
    world, results = runs
    for precision in ("fp32", "bf16"):
        ref = results[0][0, precision]["params"]
        for res in results:
            for zero in (1, 2):
                got = res[zero, precision]["params"]
                for n in ref:
                    torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7)
        for zero in (1, 2):
            merged = merge_shards([res[zero, precision]["shard"] for res in results])
            full = results[0][zero, precision]["full"]
            for n, st in full["params"].items():
                for k, t in st.items():
                    assert torch.equal(merged["params"][n][k], t), (zero, n, k)
