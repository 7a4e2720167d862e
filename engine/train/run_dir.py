"""A training run's out_dir: the lock, the kept checkpoints, and what a new run may do
with the ones already there.

    out_dir/run.lock                    pid, host, start time of the run holding it
    out_dir/checkpoints/step_000200/    complete checkpoints (engine/train/checkpoint.py), the
    out_dir/checkpoints/step_000300/    last train.keep_checkpoints of them
    out_dir/checkpoints/latest          "step_000300": the newest, replaced atomically
    out_dir/checkpoint -> checkpoints/step_000300   the same pointer as a symlink

Why a symlink for `checkpoint`: every reader (evaluate, prune, distill --teacher,
init_from, the Makefile and reports) keeps the path it always used, and replacing a
symlink is one atomic rename, so that path names a complete checkpoint at every instant.
Step directories are never renamed or rewritten once complete (keeping the newest one
under a fixed name would need two renames per save, and a crash between them leaves no
checkpoint under that name). Resume does not trust the pointers: it takes the newest
step directory that verifies (every sha256) and falls back to the previous one with a
one-line warning, setting the bad one aside as step_N.bad (never deleted).

A save writes checkpoints/step_N.tmp, seals it (meta.json last), renames it to step_N,
then updates `latest`, then the symlink, then removes checkpoints beyond the newest K.
A crash at any point leaves every earlier complete checkpoint, and the next run removes
only the partial .tmp. A fresh run on an out_dir that holds checkpoints refuses unless
--force (the old ones move to checkpoints.replaced/, removed only once the new run has
saved its first checkpoint) or --resume: neither silently discards a run nor silently
continues one whose command line changed.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket

from engine.train import checkpoint as ckpt_lib
from engine.train import faults

CHECKPOINTS = "checkpoints"
LINK = "checkpoint"
LATEST = "latest"
LOCK = "run.lock"
REPLACED = "checkpoints.replaced"
_STEP = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _aside(path: str, suffix: str) -> str:
    """A free sibling name path.<suffix>[.N] to rename something to (never overwrite)."""
    dest, n = f"{path}.{suffix}", 1
    while os.path.lexists(dest):
        n += 1
        dest = f"{path}.{suffix}.{n}"
    return dest


# ---- the lock ---------------------------------------------------------------------------
class RunLockedError(ValueError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An flock on out_dir/run.lock, its content naming the holder. The kernel drops an
    flock when its process dies however it dies, so a lock file left by a killed run is
    recognised as stale (and taken over with a warning) without trusting pids; a record
    left by a run on another host is only reported (this host cannot see that process)."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK)
        self.fd: int | None = None

    @staticmethod
    def describe(rec: dict) -> str:
        if not rec:
            return "a run that is starting (its record is not written yet)"
        return (f"pid {rec.get('pid')} on host {rec.get('host')} since {rec.get('started')}"
                + (f" ({rec['command']})" if rec.get("command") else ""))

    def _is_ours(self, fd: int) -> bool:
        try:
            cur = os.stat(self.path)
        except FileNotFoundError:
            return False
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino)

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        try:
            rec = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            rec = {"pid": "?", "host": "?", "started": "?"}
        return rec if isinstance(rec, dict) else {}

    def acquire(self, log=print, command: str = ""):
        import fcntl
        out_dir = os.path.dirname(self.path)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise RunLockedError(f"{out_dir} is in use by another run: "
                                     f"{self.describe(holder)}") from None
            # a holder releasing the lock unlinks the file: make sure ours is still the one
            # at the path, or two runs could each hold a lock on a different file
            if self._is_ours(fd):
                break
            os.close(fd)
        old = self._read(fd)
        host = socket.gethostname()
        if old:
            if old.get("host") != host:
                os.close(fd)
                raise RunLockedError(
                    f"{out_dir} holds the lock of {self.describe(old)}; this host cannot "
                    f"tell whether that run still lives: if it does not, remove {self.path}")
            state = ("no longer runs" if not isinstance(old.get("pid"), int)
                     or not _alive(old["pid"]) else "no longer holds it")
            log(f"warning: taking over the stale lock of {self.describe(old)}, which "
                f"{state}")
        if len(command) > 100:     # enough to recognise the run; the message stays short
            command = command[:97] + "..."
        rec = {"pid": os.getpid(), "host": host, "started": _now(), "command": command}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(rec).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            if self._is_ours(self.fd):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)      # drops the flock
        self.fd = None


# ---- the kept checkpoints ---------------------------------------------------------------
class CheckpointStore:
    def __init__(self, out_dir: str, keep: int = 2, log=print):
        self.out_dir = os.path.abspath(out_dir)
        self.root = os.path.join(self.out_dir, CHECKPOINTS)
        self.keep, self.log = keep, log
        # the checkpoint a resumed run started from: kept beyond `keep` until the run
        # saves at its last step, so a run that goes bad without tripping the divergence
        # guard cannot rotate away the state it started from
        self.pinned: str | None = None

    def path(self, step: int) -> str:
        return os.path.join(self.root, step_name(step))

    def tmp_for(self, step: int) -> str:
        return self.path(step) + ".tmp"

    def steps(self) -> list[tuple[int, str]]:
        """(step, dir) of every step directory, newest first. A directory gets its step
        name only once complete, so these are the complete saves (unverified)."""
        if not os.path.isdir(self.root):
            return []
        out = [(int(m.group(1)), os.path.join(self.root, n))
               for n in os.listdir(self.root) if (m := _STEP.match(n))
               and os.path.isdir(os.path.join(self.root, n))]
        return sorted(out, reverse=True)

    def legacy(self) -> str | None:
        """out_dir/checkpoint as a real directory: a checkpoint saved before step
        directories existed."""
        link = os.path.join(self.out_dir, LINK)
        return link if os.path.isdir(link) and not os.path.islink(link) else None

    def adopt_legacy(self):
        """Move a legacy out_dir/checkpoint into checkpoints/step_N (one rename: the
        complete copy exists under one of the two names at every instant)."""
        legacy = self.legacy()
        if legacy is None:
            return
        try:
            with open(os.path.join(legacy, "meta.json"), encoding="utf-8") as f:
                step = json.load(f)["step"]
            dest = self.path(int(step))
        except (OSError, ValueError, KeyError, TypeError):
            dest = None
        if dest is None or os.path.lexists(dest):
            aside = _aside(legacy, "unadopted")
            os.rename(legacy, aside)
            self.log(f"warning: {legacy} is not a readable checkpoint of a new step; moved "
                     f"to {aside}")
            return
        os.makedirs(self.root, exist_ok=True)
        os.rename(legacy, dest)
        self.log(f"moved {legacy} to {dest} (checkpoints are kept per step now)")

    # -- writing ------------------------------------------------------------------------
    def begin(self, step: int) -> str:
        """The empty temp dir of step's save. Leftover temp dirs are partial saves of an
        interrupted run (the out_dir lock says no other run writes here): removed."""
        os.makedirs(self.root, exist_ok=True)
        for name in os.listdir(self.root):
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        return ckpt_lib.make_temp_dir(self.tmp_for(step))

    def abort(self, step: int):
        shutil.rmtree(self.tmp_for(step), ignore_errors=True)

    def commit(self, step: int, meta: dict, extra_files: dict | None = None) -> str:
        tmp, final = self.tmp_for(step), self.path(step)
        ckpt_lib.seal(tmp, meta, extra_files)
        if os.path.lexists(final):
            # a same-numbered directory no resume took (it failed verification, or a run
            # resumed from an earlier one): kept aside, never deleted
            aside = _aside(final, "replaced")
            os.rename(final, aside)
            self.log(f"warning: {final} existed; moved to {aside}")
        os.rename(tmp, final)
        ckpt_lib.fsync_dir(self.root)
        faults.point("save:renamed")
        self._write_latest(step)
        faults.point("save:pointer")
        self._link(step)
        faults.point("save:linked")
        self._rotate(keep_path=final)
        return final

    def point_at(self, step: int):
        """Repair the pointers after a crash between a save's rename and its pointer
        updates (resume found a newer complete checkpoint than they name)."""
        latest = os.path.join(self.root, LATEST)
        try:
            with open(latest, encoding="utf-8") as f:
                current = f.read().strip()
        except OSError:
            current = None
        if current != step_name(step):
            self._write_latest(step)
        link = os.path.join(self.out_dir, LINK)
        if not os.path.islink(link) or os.readlink(link) != os.path.join(CHECKPOINTS,
                                                                          step_name(step)):
            self._link(step)

    def _write_latest(self, step: int):
        tmp = os.path.join(self.root, LATEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(step_name(step) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.root, LATEST))
        ckpt_lib.fsync_dir(self.root)

    def _link(self, step: int):
        link = os.path.join(self.out_dir, LINK)
        if os.path.isdir(link) and not os.path.islink(link):
            return        # a legacy directory that could not be adopted stays as it is
        tmp = link + ".tmp-link"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        try:
            os.symlink(os.path.join(CHECKPOINTS, step_name(step)), tmp)
        except OSError as e:       # no symlinks here: checkpoints/latest still points
            self.log(f"warning: cannot create the {link} symlink ({e}); read "
                     f"{os.path.join(self.root, LATEST)} instead")
            return
        os.replace(tmp, link)
        ckpt_lib.fsync_dir(self.out_dir)

    def _rotate(self, keep_path: str):
        """Remove complete checkpoints beyond the newest `keep` (never `keep_path`, the
        one just written), then what --force set aside (the new run has one now)."""
        for i, (_, path) in enumerate(self.steps()):
            if i >= self.keep and path not in (keep_path, self.pinned):
                shutil.rmtree(path)
                faults.point("save:rotating")
        replaced = os.path.join(self.out_dir, REPLACED)
        if os.path.isdir(replaced):
            shutil.rmtree(replaced)

    # -- reading ------------------------------------------------------------------------
    def newest(self) -> str | None:
        steps = self.steps()
        return steps[0][1] if steps else None

    def select(self, log=print) -> str:
        """The newest checkpoint that verifies; each unusable newer one is reported in one
        line and set aside as step_N.bad."""
        reasons = []
        for step, path in self.steps():
            try:
                ckpt_lib.Checkpoint(path)
                return path
            except ckpt_lib.CheckpointError as e:
                aside = _aside(path, "bad")
                os.rename(path, aside)
                reasons.append(f"{step_name(step)}: {e}")
                log(f"warning: checkpoint {path} is unusable ({e}); moved to {aside}, trying "
                    "the previous one")
        raise ckpt_lib.CheckpointError(f"--resume: no usable checkpoint in {self.root}"
                                       + (f" ({'; '.join(reasons)})" if reasons else ""))

    def set_aside(self, log=print):
        """--force: the existing checkpoints move to checkpoints.replaced/ (removed after
        the new run's first save, so a crash before it still leaves them)."""
        replaced = os.path.join(self.out_dir, REPLACED)
        if not self.steps():
            return
        if os.path.isdir(replaced):
            # left by an earlier --force run that saved since (else steps() would be
            # empty): superseded twice over
            shutil.rmtree(replaced)
        os.rename(self.root, replaced)
        link = os.path.join(self.out_dir, LINK)
        if os.path.islink(link):
            os.unlink(link)
        metrics = os.path.join(self.out_dir, "metrics.jsonl")
        if os.path.isfile(metrics):
            os.replace(metrics, os.path.join(self.out_dir, "metrics.replaced.jsonl"))
        log(f"--force: the earlier checkpoints of {self.out_dir} moved to {replaced} (removed "
            "once this run saves its first checkpoint)")


# ---- what a run does with its out_dir at start ------------------------------------------
class RunDir:
    """The out_dir of one run: lock held (rank 0), checkpoint to resume (or None)."""

    def __init__(self, lock: RunLock | None, resume_path: str | None):
        self.lock, self.resume_path = lock, resume_path

    def close(self):
        if self.lock is not None:
            self.lock.release()


def _decide(out_dir: str, resume: bool, force: bool, keep: int, log, command: str):
    if resume and force:
        raise ValueError("--resume and --force exclude each other")
    os.makedirs(out_dir, exist_ok=True)
    lock = RunLock(out_dir).acquire(log, command)
    try:
        store = CheckpointStore(out_dir, keep, log)
        store.adopt_legacy()
        newest = store.newest()
        replaced = os.path.join(out_dir, REPLACED)
        aside = (f" (an interrupted --force run set the earlier ones aside in {replaced}: "
                 "move them back to checkpoints/ to resume them)"
                 if os.path.isdir(replaced) else "")
        path = None
        if resume:
            if newest is None:
                raise ValueError(f"--resume: no checkpoint in {store.root}{aside}")
            path = store.select(log)
            store.point_at(int(_STEP.match(os.path.basename(path)).group(1)))
        elif newest is not None:
            if not force:
                raise ValueError(f"{out_dir} already holds checkpoints (newest "
                                 f"{os.path.basename(newest)}): pass --resume to continue "
                                 "that run or --force to start over")
            store.set_aside(log)
        elif aside and not force:
            # only --force consents to the deletion of what it set aside
            raise ValueError(f"{out_dir} has no checkpoint of its own{aside}; pass --force "
                             "to start over anyway")
        return RunDir(lock, path)
    except BaseException:
        lock.release()
        raise


def open_run_dir(out_dir: str, *, resume: bool = False, force: bool = False, keep: int = 2,
                 state=None, log=print, command: str = "") -> RunDir:
    """Rank 0 takes the lock and decides (refuse / resume from which checkpoint / start
    over); every rank gets the same answer or raises the same error, so a refusal is one
    line on every rank rather than a hang."""
    from engine.parallel.state import or_single
    state = or_single(state, "cpu")
    answer = None
    if state.rank == 0:
        try:
            answer = _decide(out_dir, resume, force, keep, log, command)
        except Exception as e:             # re-raised on every rank below
            answer = e
    # the other ranks need only the error or the checkpoint to resume from (the lock is
    # rank 0's); a single process keeps its answer as it is
    sent = state.broadcast_object(answer if state.rank != 0 or isinstance(answer, Exception)
                                  else answer.resume_path)
    if state.rank != 0:
        answer = sent if isinstance(sent, Exception) else RunDir(None, sent)
    if isinstance(answer, Exception):
        raise answer
    return answer
