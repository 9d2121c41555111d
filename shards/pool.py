"""The converters' process pool: results recorded as they arrive, and a pool that stops at once.

`run_all(func, calls, workers, on_result)` runs func(*args) for every args on `workers`
processes and hands each result to on_result in this process as soon as it arrives (in
completion order), so the caller records finished work while the rest is still running. The
first failure of a call, a Ctrl-C (KeyboardInterrupt) or an exception of on_result stops every
worker at once (Pool.terminate: the running calls are killed, queued ones never start) and is
re-raised here; results that arrived before it have all been handed to on_result.

Workers never outlive this process: each asks the kernel for SIGKILL when its parent dies
(Linux prctl PR_SET_PDEATHSIG) and also watches the parent's pid (other systems, and a parent that
died before the request). They ignore SIGINT: Ctrl-C reaches the whole terminal process group, and
stopping is the parent's job (one message instead of a traceback per worker).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

from sdlora_ds.runlock import pid_alive

_PR_SET_PDEATHSIG = 1


def _watch_parent(pid: int) -> None:
    while pid_alive(pid):
        time.sleep(0.5)
    os._exit(1)


def worker_init(parent_pid: int) -> None:
    """Pool initializer: die with the parent, leave Ctrl-C to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # the watch below still applies
    if not pid_alive(parent_pid):  # died before the request above took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()


def run_all(func: Callable, calls: Sequence[tuple], workers: int, on_result: Callable[[Any], None]) -> None:
    """See the module docstring. func must be picklable (module level)."""
    failure: list[BaseException] = []
    left = [len(calls)]
    wake = threading.Event()

    # Both callbacks run in the pool's result-handler thread, one at a time.
    def ok(result: Any) -> None:
        try:
            on_result(result)
        except BaseException as e:  # e.g. a full disk while recording: stop like any failure
            failure.append(e)
        left[0] -= 1
        if left[0] == 0 or failure:
            wake.set()

    def bad(exc: BaseException) -> None:
        failure.append(exc)
        wake.set()

    if not calls:
        return
    pool = multiprocessing.get_context().Pool(workers, initializer=worker_init, initargs=(os.getpid(),))
    try:
        for args in calls:
            pool.apply_async(func, args, callback=ok, error_callback=bad)
        # Poll the flag and sleep rather than block in wake.wait(): a Ctrl-C that lands inside
        # Event.wait's lock handling may leave the event's lock held; the result-handler thread's next
        # wake.set() would then block and pool.terminate() (which joins that thread) hang. time.sleep
        # takes the KeyboardInterrupt with no lock held. (A loaded CI run once hung in the Ctrl-C test
        # past 120 s; this is the suspected cause, not a reproduced one.)
        while not wake.is_set():
            time.sleep(0.1)
    finally:
        pool.terminate()  # at once: running calls die; what they were writing is a temporary file
        pool.join()
    if failure:
        raise failure[0]
