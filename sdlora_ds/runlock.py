"""One trainer per run folder: a lock file `run_dir/run.lock` held while a trainer writes into it.

The lock file is created atomically (O_CREAT | O_EXCL) and holds the holder's host, pid, the
process's start time and the command line. It is released on every exit Python sees (normal end,
exceptions, SIGINT/SIGTERM, sys.exit: `release` in the trainer's `finally`, an atexit hook, and
`release_all` before the watchdogs' os._exit). A SIGKILL or a dead machine leaves it behind, so a
lock found on start is judged:

  * this host: held while its pid is alive and is still the same process (its start time, from
    /proc, matches: a pid reused by another program does not hold the lock); else stale;
  * another host (output_dir on a shared filesystem, multi-node): the holder touches the file
    every `heartbeat_s` seconds from a daemon thread; a file not touched for `stale_s` seconds
    (the holder's own setting, recorded in the file) is stale.

A stale lock is taken over with a note naming the old holder; a held one stops the new trainer
with RunLockError (a ValueError: one `error:` line, exit status 2) naming the holder. Only global
rank 0 takes the lock (multi-node runs share output_dir; the trainer broadcasts the outcome).
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

LOCK_NAME = "run.lock"
_held: set = set()  # RunLocks held by this process (release_all before a hard exit)


class RunLockError(ValueError):
    """The run folder is in use by another trainer (a user-facing error naming the holder)."""


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22; Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Is process `pid` alive on this host (signal 0; shards/pool.py's parent watch uses it too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(info: dict) -> str:
    return (f"pid {info.get('pid')} on host {info.get('host')!r}, started {info.get('started')}"
            f" ({info.get('command', '?')})")


class RunLock:
    def __init__(self, run_dir: str, heartbeat_s: float = 30.0, stale_s: float = 300.0):
        assert stale_s > 2 * heartbeat_s, "a live holder must touch the lock well within stale_s"
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LOCK_NAME)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.info: Optional[dict] = None
        self._created_dir = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._old_sigterm = None

    # ------------------------------------------------------------------ taking it
    def acquire(self) -> list:
        """Take the lock; returns notes to print (a stale lock taken over). RunLockError if held."""
        self._created_dir = not os.path.exists(self.run_dir)  # removed again on release if left empty
        os.makedirs(self.run_dir, exist_ok=True)
        notes = []
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
              "heartbeat_s": self.heartbeat_s, "stale_s": self.stale_s}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raw, info, age = self._read()
                why = self._stale_reason(info, age)
                if why is None:
                    raise RunLockError(
                        f"run folder {self.run_dir!r} is in use by another trainer: {describe(info)} (lock file "
                        f"{self.path}); wait for it to end or stop it, or give this run another name (config "
                        f"field 'name'). A lock left by a dead process is taken over automatically") from None
                if self._take_over(raw):
                    if info.get("pid") != os.getpid() or info.get("host") != me["host"]:
                        notes.append(f"note: took over the stale lock of {describe(info)}: {why}")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.info = me
            _held.add(self)
            self._thread = threading.Thread(target=self._beat, name="sdlora-runlock", daemon=True)
            self._thread.start()
            self._catch_sigterm()
            return notes
        raise RunLockError(f"run folder {self.run_dir!r}: could not take the lock {self.path} (other trainers keep "
                           f"taking it); start one trainer per run folder")

    def _read(self) -> tuple:
        """(raw text, parsed info or {}, seconds since the holder last touched it)."""
        try:
            age = time.time() - os.path.getmtime(self.path)
            with open(self.path) as f:
                raw = f.read()
        except FileNotFoundError:
            return "", {}, float("inf")
        try:
            info = json.loads(raw)
        except json.JSONDecodeError:
            info = {}
        return raw, info if isinstance(info, dict) else {}, age

    def _stale_reason(self, info: dict, age: float) -> Optional[str]:
        """Why the lock described by `info` is stale, or None if its holder may still be writing."""
        if not info:  # unreadable: a holder still writing it (a fraction of a second) or a damaged file
            return None if age < 10 else f"unreadable lock file, untouched for {age:.0f} s"
        if info.get("host") == socket.gethostname():
            pid = int(info.get("pid", -1))
            if pid == os.getpid():
                return "this process (an earlier trainer in it that did not release the lock)"
            if not pid_alive(pid):
                return f"process {pid} is gone"
            now = _proc_start(pid)
            if info.get("pid_start") and now and now != info["pid_start"]:
                return f"pid {pid} now belongs to another process"
            return None
        stale_s = float(info.get("stale_s", self.stale_s))
        return f"no heartbeat for {age:.0f} s (more than {stale_s:.0f} s)" if age > stale_s else None

    def _take_over(self, judged: str) -> bool:
        """Move the stale lock aside; False if it changed since it was judged (another trainer was
        faster: the loop looks again)."""
        aside = f"{self.path}.stale-{socket.gethostname()}-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside) as f:
            moved = f.read()
        if moved != judged:  # a fresh lock of a faster trainer: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        return True

    # ------------------------------------------------------------------ holding it
    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._is_mine():
                    raise FileNotFoundError(self.path)
                os.utime(self.path)
            except OSError as e:
                if not warned:
                    print(f"warning: run lock {self.path} is gone or taken over ({e}); another trainer may now "
                          f"write into {self.run_dir}", file=sys.stderr, flush=True)
                    warned = True

    def _is_mine(self) -> bool:
        _, info, _ = self._read()
        return self.info is not None and info.get("pid") == self.info["pid"] and \
            info.get("host") == self.info["host"] and info.get("started") == self.info["started"]

    def _catch_sigterm(self) -> None:
        """SIGTERM (what launchers send first) unwinds like Ctrl-C, so `finally` releases the lock."""
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            def on_term(signum, frame):
                raise SystemExit(128 + signum)
            self._old_sigterm = signal.signal(signal.SIGTERM, on_term)

    def release(self) -> None:
        """Remove the lock if it is still this holder's (idempotent)."""
        if self.info is None:
            return
        self._stop.set()
        try:
            if self._is_mine():
                os.remove(self.path)
        except OSError:
            pass
        self.info = None
        _held.discard(self)
        if self._created_dir:
            try:
                os.rmdir(self.run_dir)  # only if empty: a run stopped before writing anything leaves no folder
            except OSError:
                pass
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None


def release_all() -> None:
    """Release every lock of this process (before os._exit, and at interpreter exit)."""
    for lock in list(_held):
        lock.release()


atexit.register(release_all)
