"""The run-folder lock: a second trainer is refused naming the holder, stale locks (a dead pid on
this host, a silent other host) are taken over, and the lock goes on every exit Python sees
(normal end, exception, SIGTERM); a SIGKILLed holder leaves a lock the next start takes over."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from sdlora_ds.runlock import LOCK_NAME, RunLock, RunLockError

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from sdlora_ds.runlock import RunLock
lock = RunLock({run_dir!r}, heartbeat_s=0.2, stale_s=2.0)
lock.acquire()
print("locked", flush=True)
try:
    if {mode!r} == "raise":
        raise RuntimeError("boom")
    time.sleep(60)
finally:
    lock.release()
"""


def holder(run_dir, mode="sleep") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, run_dir=str(run_dir), mode=mode)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(RunLockError, match=rf"in use by another trainer: pid {proc.pid} on host "
                                               rf"'{socket.gethostname()}'.*{LOCK_NAME}"):
            RunLock(str(tmp_path)).acquire()
        assert "\n" not in str(pytest.raises(RunLockError, RunLock(str(tmp_path)).acquire).value)
    finally:
        proc.send_signal(signal.SIGTERM)  # a launcher's first signal: the lock goes with it
        proc.wait(timeout=120)
    assert not os.path.exists(tmp_path / LOCK_NAME)
    lock = RunLock(str(tmp_path))
    assert lock.acquire() == []  # free now: no note
    lock.release()
    assert not os.path.exists(tmp_path / LOCK_NAME)


def test_released_on_an_exception(tmp_path):
    proc = subprocess.run([sys.executable, "-c", HOLD.format(root=ROOT, run_dir=str(tmp_path), mode="raise")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "boom" in proc.stderr
    assert not os.path.exists(tmp_path / LOCK_NAME)


def test_a_sigkilled_holders_lock_is_taken_over_with_a_note(tmp_path):
    proc = holder(tmp_path)
    proc.kill()
    proc.wait(timeout=120)
    assert os.path.exists(tmp_path / LOCK_NAME)  # nothing runs on SIGKILL
    lock = RunLock(str(tmp_path))
    notes = lock.acquire()
    assert len(notes) == 1 and f"pid {proc.pid}" in notes[0] and "is gone" in notes[0], notes
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_another_hosts_lock_is_stale_once_its_heartbeat_stops(tmp_path):
    other = {"host": "node-7", "pid": 1234, "started": "2026-01-01T00:00:00", "command": "train.py",
             "heartbeat_s": 1.0, "stale_s": 5.0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(RunLockError, match="pid 1234 on host 'node-7'"):  # touched just now: alive
        RunLock(str(tmp_path)).acquire()
    old = time.time() - 60
    os.utime(tmp_path / LOCK_NAME, (old, old))
    lock = RunLock(str(tmp_path))
    notes = lock.acquire()
    assert "node-7" in notes[0] and "no heartbeat for" in notes[0], notes
    lock.release()


def test_the_holder_keeps_its_lock_fresh(tmp_path):
    proc = holder(tmp_path)
    try:
        old = time.time() - 60
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(1.0)  # several heartbeats of 0.2 s
        assert time.time() - os.path.getmtime(tmp_path / LOCK_NAME) < 1.0
    finally:
        proc.kill()
        proc.wait(timeout=120)


def test_a_lock_whose_pid_was_reused_is_stale(tmp_path):
    """This host, a live pid, but another process than the one that wrote the lock."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        info = {"host": socket.gethostname(), "pid": live.pid, "pid_start": "1", "started": "x"}
        (tmp_path / LOCK_NAME).write_text(json.dumps(info))
        lock = RunLock(str(tmp_path))
        notes = lock.acquire()
        assert "another process" in notes[0], notes
        lock.release()
    finally:
        live.kill()
        live.wait()
