"""ParallelDims validation and rank math, without a process group."""
import itertools

import pytest

from engine.parallel.state import (Coords, ParallelDims, ParallelState, coords_to_rank,
                                   rank_groups, rank_to_coords, stage_layers)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=0), "tp=0 must be a positive integer"),
    (dict(pp=-1), "pp=-1 must be a positive integer"),
    (dict(dp=1.5), "dp=1.5 must be a positive integer"),
    (dict(vpp=True), "vpp=True must be a positive integer"),
    (dict(vpp=2), "vpp=2 needs pipeline parallelism"),
])
def test_dims_field_validation(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ParallelDims(**kwargs)


def test_validate_against_world_and_model():
    with pytest.raises(ValueError, match="tp\\*pp\\*dp=6 does not equal world size 4"):
        ParallelDims(tp=2, pp=3).validate(4)
    with pytest.raises(ValueError, match="num_layers=10 is not divisible by pipeline stages "
                                         "pp\\*vpp=4"):
        ParallelDims(pp=2, vpp=2).validate(2, num_layers=10)
    dims = ParallelDims(tp=2, pp=2, dp=2, vpp=3)
    assert dims.validate(8, num_layers=12) is dims
    assert dims.world_size == 8 and dims.virtual_stages == 6


def test_rank_order_is_tp_dp_pp():
    dims = ParallelDims(tp=2, pp=3, dp=2)
    # tp fastest, then dp, then pp
    assert rank_to_coords(0, dims) == Coords(tp=0, dp=0, pp=0)
    assert rank_to_coords(1, dims) == Coords(tp=1, dp=0, pp=0)
    assert rank_to_coords(2, dims) == Coords(tp=0, dp=1, pp=0)
    assert rank_to_coords(4, dims) == Coords(tp=0, dp=0, pp=1)
    assert rank_to_coords(11, dims) == Coords(tp=1, dp=1, pp=2)
    with pytest.raises(ValueError, match="rank=12 is outside world size 12"):
        rank_to_coords(12, dims)
    with pytest.raises(ValueError, match="coords.dp=2 is outside dp=2"):
        coords_to_rank(Coords(tp=0, dp=2, pp=0), dims)


@pytest.mark.parametrize("tp, pp, dp", list(itertools.product((1, 2, 3), (1, 2, 4), (1, 2))))
def test_coords_roundtrip_and_groups_partition(tp, pp, dp):
    dims = ParallelDims(tp=tp, pp=pp, dp=dp)
    world = dims.world_size
    assert [coords_to_rank(rank_to_coords(r, dims), dims) for r in range(world)] == \
        list(range(world))
    sizes = {"tp": tp, "dp": dp, "pp": pp}
    for dim in ("tp", "dp", "pp"):
        groups = rank_groups(dims, dim)
        assert len(groups) == world // sizes[dim]
        assert sorted(r for g in groups for r in g) == list(range(world))  # a partition
        for g in groups:
            coords = [rank_to_coords(r, dims) for r in g]
            # members differ only in `dim`, listed by that coordinate
            assert [getattr(c, dim) for c in coords] == list(range(sizes[dim]))
            for other in {"tp", "dp", "pp"} - {dim}:
                assert len({getattr(c, other) for c in coords}) == 1


def pipeline_peers(rank: int, dims: ParallelDims) -> tuple[int, int]:
    """ParallelState's (prev_rank, next_rank) for `rank`, with its pp ranks from rank_groups
    (no process group: the groups are not needed for the rank math)."""
    pp_ranks = next(g for g in rank_groups(dims, "pp") if rank in g)
    state = ParallelState(dims=dims, rank=rank, coords=rank_to_coords(rank, dims), device=None,
                          backend="gloo", timeout=None, tp_group=None, dp_group=None,
                          pp_group=None, tp_ranks=[], dp_ranks=[], pp_ranks=pp_ranks)
    return state.prev_rank, state.next_rank


def test_groups_match_megatron_example():
    # Megatron's docstring example: 16 ranks, tp=2, pp=4 -> dp=2
    dims = ParallelDims(tp=2, pp=4, dp=2)
    assert rank_groups(dims, "tp")[:3] == [[0, 1], [2, 3], [4, 5]]
    assert rank_groups(dims, "dp")[:3] == [[0, 2], [1, 3], [4, 6]]
    assert rank_groups(dims, "pp") == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14],
                                       [3, 7, 11, 15]]
    assert pipeline_peers(5, dims) == (1, 9)
    assert pipeline_peers(1, dims) == (13, 5)     # the ring wraps for interleaving
    with pytest.raises(ValueError, match="dim='xp'"):
        rank_groups(dims, "xp")


def test_stage_layers_plain_and_interleaved():
    assert [stage_layers(8, 4, 1, s, 0) for s in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # interleaved: chunk c of stage s is virtual stage c * pp + s
    assert stage_layers(8, 2, 2, 0, 0) == (0, 2)
    assert stage_layers(8, 2, 2, 1, 0) == (2, 4)
    assert stage_layers(8, 2, 2, 0, 1) == (4, 6)
    assert stage_layers(8, 2, 2, 1, 1) == (6, 8)
    covered = sorted(stage_layers(12, 3, 2, s, c) for s in range(3) for c in range(2))
    assert covered == [(i, i + 2) for i in range(0, 12, 2)]
    with pytest.raises(ValueError, match="num_layers=10 is not divisible by pipeline stages "
                                         "pp\\*vpp=4"):
        stage_layers(10, 2, 2, 0, 0)
    with pytest.raises(ValueError, match="stage=2 is outside pp=2"):
        stage_layers(8, 2, 2, 2, 0)
    with pytest.raises(ValueError, match="chunk=2 is outside vpp=2"):
        stage_layers(8, 2, 2, 0, 2)
