"""The heartbeat monitor (engine/parallel/monitor.py), on CPU without a process group: monitors of
several "ranks" share one in-memory store, and a rank "dies" by its thread stopping
without the clean-exit mark (what kill -9 or SIGSTOP leaves behind)."""
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from engine.parallel.monitor import Monitor, neighbours, step_guard
from engine.parallel.failures import FailureBoard, PeerError, wait_all


def _name(r):
    return f"rank {r} (stage {r})"


def _monitors(world, deadline=0.6, interval=0.05, **kw):
    store = dist.HashStore()
    mons = [Monitor(store, r, world, deadline=deadline, interval=interval,
                    board=FailureBoard(store), name=_name, attempt="t", **kw)
            for r in range(world)]
    return store, mons


def _die(mon):
    """The thread stops, nothing is published: the rank is gone as far as peers see."""
    mon._stop.set()
    mon._thread.join()


def _state(mon, backend="gloo"):
    return SimpleNamespace(rank=mon.rank, pp_ranks=list(range(mon.world)), backend=backend,
                           timeout=timedelta(seconds=mon.deadline), monitor=mon,
                           dims=SimpleNamespace(world_size=mon.world), distributed=True)


def test_peer_that_stops_beating_is_named():
    store, mons = _monitors(3)
    for m in mons:
        m.start()
    try:
        time.sleep(0.3)
        assert all(m.failure is None for m in mons)      # all beating: nothing to report
        _die(mons[2])
        t0 = time.monotonic()
        while mons[0].failure is None and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        waited = time.monotonic() - t0
        assert mons[0].failure.startswith("rank 2 (stage 2) stopped responding (no heartbeat")
        assert 0.5 <= waited < 3.0, waited               # the deadline, not much later
        assert "rank 2 (stage 2)" in FailureBoard(store).report("")
        # a collective over all three failed: identify names the silent one
        rank, why = mons[1].identify([0, 1, 2])
        assert rank == 2 and "no heartbeat" in why
    finally:
        for m in mons:
            m.stop()


def test_clean_exit_and_own_failure():
    store, mons = _monitors(3)
    for m in mons:
        m.start()
    try:
        mons[1].stop()                                  # finished: never reported as dead
        mons[2].mark_failed(RuntimeError("injected failure\nmore"))
        rank, why = mons[0].identify([0, 1, 2])         # named at once by its own status
        assert rank == 2 and why == "failed: RuntimeError: injected failure"
        time.sleep(0.9)
        assert "rank 1" not in (mons[0].failure or "")
    finally:
        for m in mons:
            m.stop()


class NeverCompletes:
    """An NCCL-like work: wait() only orders the stream (returns at once), and it never
    completes (its peer hung)."""
    def __init__(self):
        self.waited = False

    def wait(self, timeout=None):
        assert timeout is None, "NCCL waits must not block the host"
        self.waited = True

    def is_completed(self):
        return False


@pytest.mark.parametrize("peer", ["alive", "dead"])
def test_work_that_never_completes_is_ended_by_the_deadline(peer):
    aborted = threading.Event()
    store, mons = _monitors(2, deadline=0.8)
    me, other = mons
    me.on_expire = lambda message: aborted.set()      # the real one aborts the NCCL groups
    me.first_step = False                             # no first-step compile allowance
    for m in mons:
        m.start()
    me.status = "busy in step 2"
    other.status = "busy in step 1"                   # alive, a step behind: stuck there
    if peer == "dead":
        _die(other)
    state = _state(me, backend="nccl")
    work = NeverCompletes()
    t0 = time.monotonic()
    with pytest.raises(PeerError) as info:
        with step_guard(state, 2):
            wait_all([work], state, "the loss all-reduce over pipeline ranks [0, 1]",
                     [[0, 1]], FailureBoard(store))
            returned = time.monotonic() - t0
            # the host blocks only where it needs the value (e.g. loss.item()); the
            # monitor's abort is what releases it, as a backend error
            assert aborted.wait(5), "the monitor never ended the wait"
            raise RuntimeError("NCCL communicator was aborted")
    elapsed = time.monotonic() - t0
    try:
        assert work.waited and returned < 0.1          # stream-ordered: no host wait
        assert 0.8 <= elapsed < 4.0, elapsed
        message = str(info.value)
        assert message.startswith("rank 0 (stage 0): step 2 failed: rank 1 (stage 1) "
                                  "stopped responding ("), message
        assert ("alive but busy in step 1, not in this collective" if peer == "alive" else
                "no heartbeat") in message, message
        if peer == "alive":   # a dead peer may be reported by its silence first
            assert "during the loss all-reduce over pipeline ranks [0, 1], still " \
                   "incomplete after 0.8s" in message
        assert FailureBoard(store).report("") == me.failure
    finally:
        for m in mons:
            m.stop()


def test_first_step_allowance_keeps_compiles_from_tripping_the_deadline():
    store, mons = _monitors(2, deadline=0.3)
    me = mons[0]
    for m in mons:
        m.start()
    try:
        me.watch(NeverCompletes(), "the step handshake", [0, 1], 0.3)
        time.sleep(0.8)                                # past the deadline, inside step 1
        assert me.failure is None
    finally:
        for m in mons:
            m.stop()


def test_a_failing_step_publishes_its_own_failure_first(monkeypatch):
    store, mons = _monitors(2)
    me, other = mons
    for m in mons:
        m.start()
    monkeypatch.setattr("engine.pipeline.p2p.FailureBoard.__init__",
                        lambda self, store_=None: setattr(self, "store", store))
    try:
        with pytest.raises(ValueError):
            with step_guard(_state(me), 4):
                raise ValueError("step 4: the global batch has no label tokens")
        assert FailureBoard(store).report("") == ("rank 0 (stage 0) raised ValueError: step 4: "
                                                  "the global batch has no label tokens")
        rank, why = other.identify([0, 1])           # the peer names it without waiting
        assert rank == 0 and why.startswith("failed: ValueError: step 4")
    finally:
        for m in mons:
            m.stop()


def test_each_rank_watches_its_ring_neighbours_in_every_group():
    from engine.parallel.state import ParallelDims, rank_groups
    dims = ParallelDims(tp=2, pp=2, dp=4)
    groups = {d: rank_groups(dims, d) for d in ("tp", "dp", "pp")}
    watchers = {r: set() for r in range(dims.world_size)}
    for r in range(dims.world_size):
        mine = [next(g for g in groups[d] if r in g) for d in ("tp", "dp", "pp")]
        watched = neighbours(r, mine)
        assert len(watched) <= 5 and r not in watched    # constant, not the group sizes
        for w in watched:
            watchers[w].add(r)
    assert all(len(w) >= 2 for w in watchers.values())   # nobody dies unwatched
