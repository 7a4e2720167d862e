"""One line per failure: the runners' error boundary.

A runner's expected failures (bad input, a dead peer, a diverged run, a full or read-only
disk, an unreadable checkpoint) end as one line on stderr, `error: <what went wrong>`,
and exit code 1; anything else is a bug and keeps its traceback. Under torchrun each rank
prints at most that one line, prefixed with its rank unless the message already names it.
`--debug` on any runner's command line (or GLM_DEBUG=1) re-raises instead, with the
traceback.

    if __name__ == "__main__":
        run_main(main)

The classes are matched by name along the exception's MRO as well as by type, so this
module needs none of the modules that define them (safetensors, checkpoint, divergence).
"""
from __future__ import annotations

import errno
import inspect
import os
import sys

# by name: defined in modules this one must not import (or that may not exist yet)
EXPECTED_NAMES = frozenset({
    "PeerError", "DivergenceError", "CheckpointError", "SafetensorError", "StageError",
    "DistError", "DistBackendError", "DistNetworkError", "DistStoreError", "LockError",
})
EXPECTED_TYPES = (ValueError, OSError, FloatingPointError)


def debug_enabled() -> bool:
    return os.environ.get("GLM_DEBUG", "") not in ("", "0")


def _comm_error(err: BaseException) -> bool:
    """A bare collective failure (a gloo / NCCL RuntimeError outside the wrapped waits)."""
    if "torch.distributed" not in sys.modules:
        return False
    from engine.parallel.monitor import is_comm_error
    return is_comm_error(err)


def is_expected(err: BaseException) -> bool:
    if isinstance(err, EXPECTED_TYPES) or _comm_error(err):
        return True
    return any(c.__name__ in EXPECTED_NAMES for c in type(err).__mro__)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _os_line(err: OSError) -> str:
    where = err.filename if err.filename is not None else ""
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    why = err.strerror or _first_line(err) or type(err).__name__
    if err.errno == errno.ENOSPC:
        why = "disk full (no space left on device)"
    elif err.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied"
    elif err.errno == errno.EEXIST:
        why = "already exists (and is in the way)"
    elif err.errno == errno.EROFS:
        why = "read-only file system"
    return f"{why}: {where}" if where else why


def one_line(err: BaseException) -> str:
    """The message a user sees for `err`: one line, naming the problem."""
    if isinstance(err, OSError) and not any(c.__name__ in EXPECTED_NAMES
                                            for c in type(err).__mro__):
        return _os_line(err)
    text = _first_line(err)
    name = type(err).__name__
    if name == "SafetensorError":
        low = str(err).lower()
        if "no space" in low or "storagefull" in low or "code: 28" in low:
            return f"disk full (no space left on device) writing safetensors: {text}"
        return f"unreadable or unwritable safetensors file: {text}"
    if isinstance(err, FloatingPointError) or name == "DivergenceError":
        return text or name
    if not text:
        return name
    if _comm_error(err) and name != "PeerError":
        return f"a collective failed: {text[:200]}{_first_failure()}"
    if not isinstance(err, ValueError) and name not in ("PeerError", "CheckpointError"):
        return f"{name}: {text}"
    return text


def _first_failure() -> str:
    """The job's first failure from the rendezvous store (engine/p2p.FailureBoard)."""
    try:
        from engine.parallel.monitor import known_failure
        from engine.parallel.failures import FailureBoard
        first = FailureBoard().report("") or known_failure()
    except Exception:  # noqa: BLE001 - best effort: the store may be gone
        return ""
    return f". First failure in the job: {first}" if first else ""


def _rank_prefix(message: str) -> str:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or message.startswith("rank "):
        return message
    return f"rank {os.environ.get('RANK', '?')}: {message}"


def fail(err: BaseException):
    """Inside a runner's `except`: end with the one-line error (SystemExit, exit code 1),
    or re-raise when debugging or when `err` is not an expected failure class."""
    if debug_enabled() or not is_expected(err):
        raise err
    raise SystemExit(f"error: {_rank_prefix(one_line(err))}") from None


def run_main(main, argv: list[str] | None = None, graceful_stop: bool = False):
    """Run a runner's main(argv) behind the error boundary; exit with its return code.
    graceful_stop: training runners, where SIGTERM / SIGINT stop after the current step
    and save (engine/train/stop.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ["GLM_DEBUG"] = "1"
    if graceful_stop:   # for the whole process: a signal during the exit is the same
        from engine.train.stop import GracefulStop
        GracefulStop().__enter__()
    try:
        if inspect.signature(main).parameters:
            code = main(argv)
        else:   # a main() that reads sys.argv itself
            sys.argv[1:] = argv
            code = main()
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print(f"error: {_rank_prefix('interrupted')}", file=sys.stderr, flush=True)
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - the boundary: sorted by is_expected
        if debug_enabled() or not is_expected(err):
            raise
        print(f"error: {_rank_prefix(one_line(err))}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
