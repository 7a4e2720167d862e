"""The simulator over the full grid, on the very programs the executor runs."""
import pytest

from engine.pipeline.sim import (Op, ScheduleError, expected_bubble, grid, simulate,
                                 simulate_schedule)
from engine.pipeline.program import Msg, compute_order, stage_program


def test_full_grid_no_deadlock_and_textbook_numbers():
    seen = set()
    for schedule, p, m, v, forward_only in grid(p_max=8, m_max=32, v_max=4):
        r = simulate_schedule(schedule, p, m, v, forward_only=forward_only)
        seen.add((schedule, forward_only))
        if forward_only:
            assert r.peak_in_flight == [0] * p
            continue
        # every stage computes m * v forwards and m * v backwards
        assert all(abs(b - 3.0 * m) < 1e-9 for b in r.busy)
        if (schedule != "zb-h1" or m >= p) and (schedule != "zb-v" or m >= 2 * p - 1):
            assert r.bubble == pytest.approx(expected_bubble(schedule, p, m, v), abs=1e-9), \
                (schedule, p, m, v)
        if schedule == "1f1b":
            assert r.bubble == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
            assert r.makespan == pytest.approx(3.0 * (m + p - 1))
            assert r.peak_in_flight == [min(p - s, m) for s in range(p)], (p, m)
        if schedule == "gpipe":
            assert r.peak_in_flight == [m] * p
        if schedule == "none":
            assert r.peak_in_flight == [1]
        if schedule == "zb-h1":
            one_f = simulate_schedule("1f1b", p, m)
            if m >= p:   # the paper's (p-1)/(3m+p-1) with t_F = t_B = t_W
                assert r.bubble == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-9)
            assert r.bubble <= one_f.bubble + 1e-12, (p, m)
            # a microbatch is held from F to W: never more than 1F1B's peak (stage 0's)
            assert max(r.peak_in_flight) == max(one_f.peak_in_flight), (p, m)
            assert r.peak_in_flight[0] == one_f.peak_in_flight[0]
        if schedule == "interleaved":
            # Megatron's warmup: (p - s - 1) * 2 + (v - 1) * p forwards ahead, then one
            # more before the first backward (counted in (microbatch, chunk) units)
            assert r.peak_in_flight == [min(m * v, (p - s - 1) * 2 + (v - 1) * p + 1)
                                        for s in range(p)]
        if schedule == "zb-v":
            one_f, zb_h1 = simulate_schedule("1f1b", p, m), simulate_schedule("zb-h1", p, m)
            if m >= 2 * p - 1:   # 6m + p - 1 chunk-op units: p - 1 idle per rank
                assert r.makespan == pytest.approx(3.0 * m + (p - 1) / 2)
            # never a bigger bubble than ZB-H1 (so than 1F1B), at 1F1B's peak memory:
            # 2 chunk activations are one whole-stage microbatch
            assert r.bubble <= zb_h1.bubble + 1e-12 <= one_f.bubble + 1e-12, (p, m)
            assert max(r.peak_in_flight) == 2 * max(one_f.peak_in_flight), (p, m)
            if m >= 2 * p - 1:   # and on every rank
                assert r.peak_in_flight == [2 * p] * p, (p, m)
    assert len(seen) == 12


def test_bubble_depends_on_backward_cost_only_through_the_formula():
    # 1F1B's bubble fraction is (p-1)/(m+p-1) for any forward/backward cost ratio
    for t_b in (1.0, 2.0, 3.5):
        r = simulate_schedule("1f1b", 4, 6, t_b=t_b)
        assert r.bubble == pytest.approx(3 / 9)
        assert r.makespan == pytest.approx((6 + 3) * (1.0 + t_b))


def test_one_f_one_b_steady_state_uses_combined_ops():
    prog = [str(op) for op in stage_program("1f1b", 4, 1, 6)]
    # after a steady forward: send it, receive the gradient that pairs with it
    assert "X[send act 2.0 > next, recv grad 0.0 < next]" in prog
    # after a steady backward: send its gradient, receive the next input
    assert "X[recv act 3.0 < prev, send grad 0.0 > prev]" in prog
    # warmup p - s - 1 = 2 forwards, then strictly alternating F/B, then cooldown
    compute = [op[0][0] for op in compute_order("1f1b", 4, 1, 6)]
    assert compute == ["F", "F"] + ["F", "B"] * 4 + ["B", "B"]
    # m < p: warmup is capped at m
    assert [op[0][0] for op in compute_order("1f1b", 4, 0, 2)] == ["F", "F", "B", "B"]


def test_simulator_catches_a_deadlock():
    # both stages block on a send before posting the receive the other one waits for
    send = Op("X", msgs=(Msg("send", "act", 0, 0),))
    p0 = [Op("F", 0, 0), send, Op("X", msgs=(Msg("recv", "grad", 0, 0),)), Op("B", 0, 0)]
    p1 = [Op("X", msgs=(Msg("send", "grad", 0, 0),)), Op("X", msgs=(Msg("recv", "act", 0, 0),)),
          Op("F", 0, 0), Op("B", 0, 0)]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate([p0, p1], p=2)


def test_simulator_catches_mismatched_order():
    # stage 0 sends microbatches 0, 1; stage 1 expects 1, 0
    p0 = [Op("F", 0, 0), Op("F", 1, 0),
          Op("X", msgs=(Msg("send", "act", 0, 0),)), Op("X", msgs=(Msg("send", "act", 1, 0),))]
    p1 = [Op("X", msgs=(Msg("recv", "act", 1, 0),)), Op("X", msgs=(Msg("recv", "act", 0, 0),)),
          Op("F", 1, 0), Op("F", 0, 0)]
    with pytest.raises(ScheduleError, match="order mismatch"):
        simulate([p0, p1], p=2)


def test_simulator_catches_backward_before_forward():
    with pytest.raises(ScheduleError, match="without its forward"):
        simulate([[Op("B", 0, 0), Op("F", 0, 0)]], p=1)


def test_interleaved_pairs_forward_and_backward_in_one_exchange():
    prog = [str(op) for op in stage_program("interleaved", 2, 0, 4, 2)]
    four_way = [x for x in prog if x.count(",") == 3]
    assert four_way, "steady state should post send/recv of act and grad as one batch"
    assert four_way[0].startswith("X[send act") and "recv grad" in four_way[0]


@pytest.mark.parametrize("schedule, p, m, v, message", [
    ("interleaved", 2, 3, 2, "m=3 to be a multiple of pp=2"),
    ("interleaved", 2, 4, 1, "needs pp >= 2 and vpp >= 2"),
    ("1f1b", 2, 4, 2, "vpp=2 needs schedule='interleaved'"),
    ("none", 2, 4, 1, "schedule='none' is gradient accumulation on one stage"),
    ("zb", 2, 4, 1, "schedule='zb' must be one of"),
])
def test_invalid_combinations_fail_clearly(schedule, p, m, v, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("'", ".")):
        stage_program(schedule, p, 0, m, v)


def test_zb_h1_order_blocks_and_sends_before_w():
    # stage 1 of 4: 1F1B's warmup (2 forwards), then F B pairs with W one microbatch
    # behind B (lag s = 1), and the deferred W at the end
    kinds = [f"{k}{mb}" for slot in compute_order("zb-h1", 4, 1, 6) for k, mb, _ in slot]
    assert kinds == ["F0", "F1", "F2", "B0", "F3", "B1", "W0", "F4", "B2", "W1", "F5", "B3",
                     "W2", "B4", "W3", "B5", "W4", "W5"]
    # the input gradient of a B is posted before the W that follows it
    prog = [str(op) for op in stage_program("zb-h1", 4, 1, 6)]
    i = prog.index("B1.0")
    assert prog[i + 1].startswith("X[send grad 1.0") and prog[i + 2] == "W0.0"



def test_ranks_run_their_batches_in_posting_order():
    # gloo would match these (each message on its own), but with one ordered stream per
    # rank (NCCL) stage 1's batch waiting for stage 0's second send blocks its own first
    # send, which stage 0 needs before it can post that second send: a deadlock
    p0 = [Op("F", 0, 0), Op("X", msgs=(Msg("send", "act", 0, 0), Msg("recv", "grad", 0, 0))),
          Op("B", 0, 0), Op("F", 1, 0), Op("X", msgs=(Msg("send", "act", 1, 0),)),
          Op("X", msgs=(Msg("recv", "grad", 1, 0),)), Op("B", 1, 0)]
    p1 = [Op("X", msgs=(Msg("recv", "act", 0, 0), Msg("recv", "act", 1, 0))),
          Op("F", 0, 0), Op("B", 0, 0), Op("X", msgs=(Msg("send", "grad", 0, 0),)),
          Op("F", 1, 0), Op("B", 1, 0), Op("X", msgs=(Msg("send", "grad", 1, 0),))]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate([p0, p1], p=2)
    # posting stage 1's second receive after its first send resolves it
    p1 = [Op("X", msgs=(Msg("recv", "act", 0, 0),)), Op("F", 0, 0), Op("B", 0, 0),
          Op("X", msgs=(Msg("send", "grad", 0, 0), Msg("recv", "act", 1, 0))),
          Op("F", 1, 0), Op("B", 1, 0), Op("X", msgs=(Msg("send", "grad", 1, 0),))]
    assert simulate([p0, p1], p=2).makespan == pytest.approx(12.0)


def test_draw_writes_a_png_of_the_time_line(tmp_path):
    import struct

    from engine.pipeline.draw import draw_png
    r = simulate_schedule("zb-h1", 4, 8)
    out = tmp_path / "zb.png"
    draw_png(r, str(out), unit_px=10, row_px=20, gap_px=2)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (int(r.makespan * 10), 4 * 22 + 2)
    # every stage's ops are in the time line, back to back within the makespan
    assert all(len(ops) == 3 * 8 for ops in r.timeline)
    assert max(end for ops in r.timeline for *_, end in ops) == r.makespan


def test_zb_v_blocks_and_the_turn_sends_nothing():
    from engine.pipeline import zbv
    p, m = 4, 8
    # rank 1: 2(p-s)-1 = 5 forwards of chunk 0, s = 1 pair (F chunk 1, F chunk 0), then
    # p - s = 3 triples of chunk 1 before the steady (F, B, W) of chunk 0 then chunk 1
    kinds = [f"{k}{mb}.{c}" for k, mb, c in zbv.compute_order(p, 1, m)]
    assert kinds[:7] == ["F0.0", "F1.0", "F2.0", "F3.0", "F4.0", "F0.1", "F5.0"]
    assert kinds[7:16] == ["F1.1", "B0.1", "W0.1", "F2.1", "B1.1", "W1.1", "F3.1", "B2.1",
                           "W2.1"]
    assert kinds[16:22] == ["F6.0", "B0.0", "W0.0", "F4.1", "B3.1", "W3.1"]
    def msgs(s):
        return [(x.op, x.what, x.chunk, x.peer) for op in stage_program("zb-v", p, s, m, 2)
                for x in op.msgs]
    # the turn: rank p-1 neither sends chunk 0's activations nor receives chunk 0's
    # gradients (chunk 1 reads them in place); chunk 1's go back up to rank p-2
    last = set(msgs(p - 1))
    assert last == {("recv", "act", 0, "prev"), ("send", "grad", 0, "prev"),
                    ("send", "act", 1, "prev"), ("recv", "grad", 1, "prev")}
    # rank 0 reads input_ids with chunk 0 and computes the loss with chunk 1
    assert set(msgs(0)) == {("send", "act", 0, "next"), ("recv", "grad", 0, "next"),
                            ("recv", "act", 1, "next"), ("send", "grad", 1, "next")}
    with pytest.raises(ValueError, match="2 model chunks per stage in a V"):
        stage_program("zb-v", 4, 0, 8, 1)


def test_zb_v_without_the_fifo_placement_is_caught():
    # the receives at their readers (no early posting): rank s+1 sends chunk-0
    # activations and chunk-1 gradients to s in its own interleaving, so the pair's
    # FIFO order breaks; the simulator must say so
    from engine.pipeline import zbv
    from engine.pipeline.placement import VPlacement
    p, m = 4, 8
    programs = []
    for s in range(p):
        ops, prog = zbv.compute_order(p, s, m), []
        for i in range(len(ops) + 1):
            msgs = [zbv._produces(p, s, *ops[i - 1])] if i else []
            msgs += [zbv._needs(p, s, *ops[i])] if i < len(ops) else []
            msgs = tuple(x for x in msgs if x is not None)
            if msgs:
                prog.append(Op("X", msgs=msgs))
            if i < len(ops):
                prog.append(Op(*ops[i]))
        programs.append(prog)
    with pytest.raises(ScheduleError):
        simulate(programs, p, 2, schedule="zb-v", m=m, place=VPlacement(p))


def test_measured_costs_per_stage_and_chunk():
    # unit costs given explicitly: the default time line
    progs = [stage_program("1f1b", 2, s, 8) for s in range(2)]
    unit = {(s, 0): {"F": 1.0, "B": 2.0, "W": 0.0} for s in range(2)}
    assert simulate(progs, 2, costs=unit).makespan == simulate_schedule("1f1b", 2, 8).makespan
    # a heavier last stage (the output head): it is busy m (F1 + B1) after stage 0's
    # first forward, and stage 0's last backward follows its last backward
    costs = {(0, 0): {"F": 1.0, "B": 2.0, "W": 0.0}, (1, 0): {"F": 1.5, "B": 2.5, "W": 0.0}}
    r = simulate(progs, 2, costs=costs)
    assert r.makespan == pytest.approx(1.0 + 8 * 4.0 + 2.0)
    assert r.busy == pytest.approx([8 * 3.0, 8 * 4.0])
    # ZB-H1 with the W ops costed apart
    progs = [stage_program("zb-h1", 2, s, 8) for s in range(2)]
    split = {(s, 0): {"F": 1.0, "B": 1.0, "W": 1.0} for s in range(2)}
    assert simulate(progs, 2, costs=split).makespan == pytest.approx(
        simulate_schedule("zb-h1", 2, 8).makespan)


def test_op_seconds_groups_compute_by_chunk_and_kind():
    from engine.pipeline.stats import ScheduleStats
    st = ScheduleStats(timeline=[("F0.0", "compute", 0.0, 1.0), ("X[...]", "wait", 1.0, 3.0),
                                 ("B0.1", "wait", 3.0, 4.0), ("B0.1", "compute", 4.0, 6.5),
                                 ("F1.0", "compute", 6.5, 7.0), ("W0.1", "compute", 7.0, 7.25),
                                 ("sends", "wait", 7.25, 8.0)])
    assert st.op_seconds() == {(0, "F"): [1.0, 0.5], (1, "B"): [2.5], (1, "W"): [0.25]}


def test_simulate_measured_takes_per_rank_medians():
    from engine.pipeline.sim import simulate_measured
    per_rank = [{(0, "F"): 1.0, (0, "B"): 2.0}, {(0, "F"): 1.5, (0, "B"): 2.5}]
    step, idle = simulate_measured("1f1b", 2, 8, 1, per_rank)
    assert step == pytest.approx(35.0)
    assert idle == pytest.approx([1 - 24 / 35, 1 - 32 / 35])
