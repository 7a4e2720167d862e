"""Waiting on communication with a deadline, and naming who failed.

Every wait on a send, receive or collective has the layout's timeout. A wait that
fails (the peer died: connection closed; or hung: timed out) raises PeerError naming the
peer's rank and stage. The first failure in the job is also written to the rendezvous
store (`FailureBoard`), so ranks further away, which only see their neighbour go down,
still name the rank where it started. Used by the pipeline's P2P, the heartbeat monitor,
the graceful stop and the runners' error boundary.
"""
from __future__ import annotations

import time
from datetime import timedelta

import torch.distributed as dist


class PeerError(RuntimeError):
    """Communication with another rank failed (it died, hung, or raised)."""


class FailureBoard:
    """First failure of the job, in the rendezvous store (first writer wins). Best
    effort: if the store itself is gone (its host died) messages just lack the origin."""
    KEY = "engine/first_failure"

    def __init__(self, store=None):
        if store is None and dist.is_initialized():
            try:
                store = dist.distributed_c10d._get_default_store()
            except Exception:  # noqa: BLE001 - no store: no board
                store = None
        self.store = store

    def report(self, message: str) -> str | None:
        """Record `message` unless a failure is already recorded; return the first one."""
        if self.store is None:
            return None
        try:
            return self.store.compare_set(self.KEY, "", message).decode()
        except Exception:  # noqa: BLE001
            return None


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:limit]


def _where(state, rank: int) -> str:
    if not state.distributed or rank not in state.pp_ranks:
        return f"rank {rank}"
    return f"rank {rank} (stage {state.pp_ranks.index(rank)})"


def wait_all(works, state, what: str, peers, board: FailureBoard | None = None,
             timeout: timedelta | None = None, started: float | None = None):
    """Wait for every work by one shared deadline; translate a failure into PeerError.
    peers[i] names who work i talks to: a rank, or the ranks of a collective."""
    timeout = timeout or state.timeout
    started = time.monotonic() if started is None else started
    deadline = started + timeout.total_seconds()
    # NCCL: wait() orders the current stream after the transfer without blocking the
    # host; a timed wait would block it. The heartbeat monitor's thread times the work
    # instead (engine/parallel/monitor.py), the process-group watchdog is the backstop.
    host_wait = state.backend != "nccl"
    monitor = getattr(state, "monitor", None)
    if monitor is not None:
        status, monitor.status = monitor.status, f"waiting: {what}"
    for i, work in enumerate(works):
        try:
            if host_wait:
                work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
            else:
                work.wait()
                if monitor is not None:
                    monitor.watch(work, what, peers[i], timeout.total_seconds())
        except Exception as err:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses
            raise peer_error(state, what, peers[i], err, board, time.monotonic() - started,
                             timeout) from err
    if monitor is not None:
        monitor.status = status


def peer_error(state, what: str, peer, err: BaseException, board: FailureBoard | None,
               elapsed: float = 0.0, timeout: timedelta | None = None) -> PeerError:
    me = _where(state, state.rank) if state.distributed else "this rank"
    them = _where(state, peer) if isinstance(peer, int) else f"ranks {peer}"
    text = str(err)
    if "imed out" in text or "timeout" in text.lower():
        why = f"no answer within {timeout.total_seconds() if timeout else elapsed:g}s"
    elif "closed" in text or "reset" in text.lower() or "broken pipe" in text.lower():
        why = "connection closed: the peer process exited or crashed"
    else:
        why = _first_line(err)
    monitor = getattr(state, "monitor", None)
    if monitor is not None and not isinstance(peer, int):
        # a collective names only its group: the heartbeats name the member that failed
        culprit = monitor.identify(list(peer))
        if culprit is not None:
            them, why = _where(state, culprit[0]), f"{why} ({culprit[1]})"
    first = None
    if board is not None:
        first = board.report(f"{them} stopped responding ({why}); seen by {me} during {what}")
    msg = f"{me}: {what} with {them} failed after {elapsed:.1f}s: {why}"
    if first:
        msg += f". First failure in the job: {first}"
    return PeerError(msg)
