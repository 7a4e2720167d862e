"""Heartbeats: which rank died or hung, when a collective only says "the group failed".

Every rank runs one daemon thread that beats a counter into the rendezvous store
(`engine/hb/<attempt>/<rank>` = "<count>|<status>") every `interval` seconds and reads
the counters of its neighbours in each of its groups (so every rank is watched, with
constant store traffic per rank). A peer whose counter has not moved for
`deadline` seconds (the layout's timeout) is dead or frozen (SIGSTOP, a wedged host): the
thread records that as the job's first failure on the FailureBoard (engine/pipeline/p2p.py), so
the next error anywhere names it. Staleness is measured on the watcher's own monotonic
clock (a counter, not a timestamp), so host clocks need not agree.

The status is what the rank's main thread is doing ("busy in step 3", "waiting: the loss
all-reduce ...", "failed: ...", "exited"), set by plain attribute writes (no I/O on the
hot path) and published with the next beat. When a collective fails on this rank
(`identify`): a member whose status says it failed is named at once; otherwise the
members are watched for a few beats and the one whose counter does not move is named;
if all are alive, one that is not waiting in the same collective is named as the one
holding it up.

NCCL: a work's wait() only orders the stream, so wait_all hands the work to `watch`, and
this thread polls `is_completed()` (off the hot path: the host keeps queueing work). A
work still incomplete past its deadline gets the culprit recorded on the board, then
`on_expire` (default: abort the process group so the blocked host call returns, and the
step ends with PeerError naming the culprit; the group's own timeout is the backstop).
The first step gets FIRST_STEP_ALLOWANCE_S more: it includes the Triton JIT compiles
(1-36 s per kernel variant, stage after stage). Compiles cannot make a rank look dead:
the beats come from this thread, which runs while the main thread compiles.

The thread uses its own client connection to the store, not the process group's: the
group's client serialises requests, and a blocking rendezvous read would stop the beats.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
from datetime import timedelta

import torch.distributed as dist

FIRST_STEP_ALLOWANCE_S = 600.0
PREFIX = "engine/hb"


def _where(state, rank: int) -> str:
    from engine.parallel.failures import _where as where
    return where(state, rank)


class Monitor:
    """store: a torch.distributed Store. watch: the ranks to watch (default all others).
    name(rank) -> "rank 1 (stage 1)". board: a FailureBoard (None: no board reports).
    on_expire(message): called once when a watched work misses its deadline."""

    def __init__(self, store, rank: int, world: int, *, watch=None, deadline: float = 120.0,
                 interval: float | None = None, board=None, name=None, on_expire=None,
                 attempt: str | None = None, clock=time.monotonic):
        self.store, self.rank, self.world = store, rank, world
        self.peers = sorted(set(range(world) if watch is None else watch) - {rank})
        self.deadline = float(deadline)
        self.interval = interval or min(1.0, max(0.05, self.deadline / 8))
        self.board, self.on_expire, self.clock = board, on_expire, clock
        self.name = name or (lambda r: f"rank {r}")
        attempt = attempt if attempt is not None else os.environ.get(
            "TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"{PREFIX}/{attempt}"
        self.status = "starting"
        self.first_step = True
        self.failure: str | None = None      # what this monitor found, first only
        self._count = 0
        self._seen: dict[int, tuple[str, float]] = {}   # rank -> (value, when it changed)
        self._reported: set[int] = set()
        self._works: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = clock()

    # ---- the store ---------------------------------------------------------------------
    def key(self, rank: int) -> str:
        return f"{self.prefix}/{rank}"

    def beat(self):
        self._count += 1
        try:
            self.store.set(self.key(self.rank), f"{self._count}|{self.status}")
        except Exception:  # noqa: BLE001 - the store's host is gone: nothing to publish to
            pass

    def read(self, ranks) -> dict[int, str]:
        """Latest published values of `ranks` that have one (a rank not started yet has
        none); missing keys are skipped without waiting. Two round trips when every key
        exists (the usual case)."""
        ranks = list(ranks)
        keys = [self.key(r) for r in ranks]
        try:
            if keys and self.store.check(keys):
                return {r: v.decode() for r, v in zip(ranks, self.store.multi_get(keys))}
        except Exception:  # noqa: BLE001 - fall back to one key at a time
            pass
        out = {}
        for r in ranks:
            try:
                if self.store.check([self.key(r)]):
                    out[r] = self.store.get(self.key(r)).decode()
            except Exception:  # noqa: BLE001
                pass
        return out

    def poll(self, ranks=None) -> dict[int, str]:
        now = self.clock()
        values = self.read(self.peers if ranks is None else ranks)
        for r, v in values.items():
            if self._seen.get(r, (None,))[0] != v:
                self._seen[r] = (v, now)
        return values

    def silent_for(self, rank: int) -> float:
        """Seconds since `rank`'s heartbeat last changed (since start if never seen)."""
        return self.clock() - self._seen.get(rank, (None, self._started))[1]

    @staticmethod
    def status_of(value: str | None) -> str:
        return value.split("|", 1)[1] if value and "|" in value else ""

    # ---- one round of the thread ------------------------------------------------------
    def check(self):
        self.beat()
        values = self.poll()
        for r in self.peers:
            status = self.status_of(values.get(r))
            if r in self._reported or status == "exited":
                continue
            if status.startswith("failed:"):
                self._reported.add(r)
                self._record(f"{self.name(r)} {status}")
            elif self.silent_for(r) > self.deadline:
                self._reported.add(r)
                self._record(f"{self.name(r)} stopped responding (no heartbeat for "
                             f"{self.silent_for(r):.1f}s: dead or frozen); seen by "
                             f"{self.name(self.rank)}")
        self._check_works()

    def _record(self, message: str):
        if self.failure is None:
            self.failure = message
        if self.board is not None:
            self.board.report(message)

    # ---- works that only the thread can time (NCCL) -----------------------------------
    def watch(self, work, what: str, peers, timeout: float):
        """Track an issued work until it completes; past `timeout` (+ the first step's
        allowance) it expires."""
        allowance = FIRST_STEP_ALLOWANCE_S if self.first_step else 0.0
        with self._lock:
            # completed works go at once: a work keeps its tensors alive (a cheap event
            # query on NCCL, no host wait)
            while self._works and self._done(self._works[0][0]):
                self._works.pop(0)
            self._works.append((work, self.clock() + timeout + allowance, what, peers,
                                timeout + allowance))

    @staticmethod
    def _done(work) -> bool:
        try:
            return work.is_completed()
        except Exception:  # noqa: BLE001 - a failed work raises in the main thread
            return True

    def _check_works(self):
        with self._lock:
            works, self._works = self._works, []
        now, keep = self.clock(), []
        for item in works:
            work, due, what, peers, limit = item
            if self._done(work):
                continue
            if now < due:
                keep.append(item)
                continue
            culprit = self.culprit(peers if isinstance(peers, (list, tuple)) else [peers],
                                   host_waits=False)
            them = (self.name(culprit[0]) if culprit else
                    self.name(peers) if isinstance(peers, int) else f"ranks {peers}")
            why = culprit[1] if culprit else ("no answer; every member still beats: one is "
                                              "stuck outside this collective")
            message = (f"{them} stopped responding ({why}); seen by {self.name(self.rank)} "
                       f"during {what}, still incomplete after {limit:g}s")
            self._record(message)
            if self.on_expire is not None:
                self.on_expire(message)
            return   # one expiry ends the step; the rest fail with it
        with self._lock:
            self._works[:0] = keep

    # ---- naming -----------------------------------------------------------------------
    def culprit(self, ranks, host_waits: bool = True) -> tuple[int, str] | None:
        """Best guess from what is known now, without waiting. host_waits: statuses say
        who waits in a collective (gloo); on NCCL a wait returns at once, so only a peer
        still in an earlier step is named from its status."""
        others = [r for r in ranks if r != self.rank]
        values = self.poll(others)
        for r in others:
            status = self.status_of(values.get(r))
            if status.startswith("failed:"):
                return r, status
        silent = [r for r in others if self.silent_for(r) > min(self.deadline,
                                                                  3 * self.interval)]
        if silent:
            r = max(silent, key=self.silent_for)
            return r, f"no heartbeat for {self.silent_for(r):.1f}s: dead or frozen"
        mine = self.status
        for r in others:
            status = self.status_of(values.get(r))
            if not status or status.startswith("waiting:") or status == mine:
                continue
            if host_waits or _step_of(status) < _step_of(mine):
                return r, f"alive but {status}, not in this collective"
        return None

    def identify(self, ranks, wait_s: float | None = None) -> tuple[int, str] | None:
        """After a collective over `ranks` failed: watch their beats for up to wait_s
        (default 3 beats) and name who failed, died or is holding it up."""
        others = [r for r in ranks if r != self.rank]
        if not others:
            return None
        wait_s = min(self.deadline, 3 * self.interval) if wait_s is None else wait_s
        start = self.poll(others)
        end = self.clock() + wait_s
        while True:
            values = self.poll(others)
            for r in others:
                status = self.status_of(values.get(r))
                if status.startswith("failed:"):
                    return r, status
            moved = [r for r in others if values.get(r) != start.get(r)]
            if len(moved) == len(others) or self.clock() >= end:
                break
            time.sleep(self.interval / 4)
        still = [r for r in others if r not in moved]
        if still:
            r = max(still, key=self.silent_for)
            return r, f"no heartbeat for {self.silent_for(r):.1f}s: dead or frozen"
        return self.culprit(others)

    # ---- the thread -------------------------------------------------------------------
    def start(self) -> "Monitor":
        self.beat()   # before the first step: a rank is known alive from the start
        self._thread = threading.Thread(target=self._run, name="engine-heartbeat",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - never let the watcher kill the rank
                pass

    def mark_failed(self, err: BaseException):
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        self.status = f"failed: {type(err).__name__}: {first}"
        self.beat()

    def stop(self):
        """Clean exit: peers stop watching this rank (a failure keeps its status)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            # out of any store call before the interpreter tears the client down
            self._thread.join(timeout=self.interval + 5.0)
        if not self.status.startswith("failed:"):
            self.status = "exited"
        self.beat()


def _step_of(status: str) -> int:
    """N of "busy in step N"; -1 before the first step."""
    head, _, n = status.rpartition("step ")
    return int(n) if head.endswith("busy in ") and n.isdigit() else -1


# ---- wiring into a run ------------------------------------------------------------------

def _store_client(timeout: float):
    """A second client of the job's rendezvous store (see the module docstring); the
    process group's own store when the address is unknown."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        try:
            return dist.TCPStore(addr, int(port), is_master=False,
                                 timeout=timedelta(seconds=max(5.0, timeout)),
                                 wait_for_workers=False)
        except Exception:  # noqa: BLE001
            pass
    return dist.distributed_c10d._get_default_store()


def _abort_groups(message: str):
    """NCCL: end the blocked host call (the communicator is aborted; the step fails)."""
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:  # noqa: BLE001 - nothing left to abort
        pass


def neighbours(rank: int, groups) -> set[int]:
    """rank's previous and next member in each group's ring: every rank of a group is
    then watched by two others, whatever the group's size."""
    out = set()
    for ranks in groups:
        i = ranks.index(rank)
        out |= {ranks[i - 1], ranks[(i + 1) % len(ranks)]}
    return out - {rank}


def start_monitor(state) -> Monitor:
    """The heartbeat monitor for a ParallelState, watching its neighbours in each of its
    groups (constant store traffic per rank at any scale; `identify` reads a failed
    group's members on demand); attached as state.monitor (wait_all and peer_error look
    for it there)."""
    from engine.parallel.failures import FailureBoard
    watch = neighbours(state.rank, (state.tp_ranks, state.dp_ranks, state.pp_ranks))
    deadline = state.timeout.total_seconds()
    mon = Monitor(_store_client(deadline), state.rank, state.dims.world_size, watch=watch,
                  deadline=deadline, board=FailureBoard(), name=lambda r: _where(state, r),
                  on_expire=_abort_groups if state.backend == "nccl" else None)
    global _current
    state.monitor = _current = mon.start()
    return mon


_current: Monitor | None = None


def known_failure() -> str | None:
    """What this process's monitor found (for the error line after the group is gone)."""
    return _current.failure if _current is not None else None


# ---- the step: statuses and collective errors named ----------------------------------

_COMM_HINTS = ("gloo", "nccl", "connection closed", "connection reset", "timed out",
               "broken pipe", "processgroup", "communicator")


def is_comm_error(err: BaseException) -> bool:
    if any(c.__name__ in ("DistError", "DistBackendError", "DistNetworkError")
           for c in type(err).__mro__):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(h in text for h in _COMM_HINTS)


@contextlib.contextmanager
def step_guard(state, step: int, what: str | None = None):
    """Around one training step (or save): publishes "step N", turns a bare collective
    error (from a collective outside wait_all: the optimizer's dp reductions, barriers)
    into PeerError naming the culprit, and publishes this rank's own failure first."""
    from engine.parallel.failures import FailureBoard, PeerError, peer_error
    mon = getattr(state, "monitor", None)
    if mon is not None:
        mon.status = f"busy in step {step}"
    started = time.monotonic()
    try:
        yield mon
    except PeerError:
        raise
    except Exception as err:
        if not state.distributed:
            raise
        if is_comm_error(err):
            ranks = list(range(state.dims.world_size))   # the group is unknown here
            if mon is not None and mon.failure:
                raise PeerError(f"{_where(state, state.rank)}: {what or f'step {step}'} "
                                f"failed: {mon.failure}") from err
            raise peer_error(state, what or f"a collective of step {step}", ranks, err,
                             FailureBoard(), time.monotonic() - started,   # since the
                             state.timeout) from err                       # step began
        if mon is not None:   # this rank failed first: say so before peers time out
            mon.mark_failed(err)
            FailureBoard().report(f"{_where(state, state.rank)} raised "
                                  f"{type(err).__name__}: {mon.status.split(': ', 2)[-1]}")
        raise
    if mon is not None:
        mon.first_step = False
