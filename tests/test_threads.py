"""sdlora_ds/threads.py: the thread count per process (never the load) and the count a resume continues with."""
import os

from sdlora_ds import threads


def test_cpu_threads(monkeypatch):
    assert threads.cpu_threads(1, {"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    cpus = threads.usable_cpus()
    assert 1 <= cpus <= (os.cpu_count() or 1)
    assert threads.cpu_threads(1, {})[0] == cpus  # all of the machine
    assert threads.cpu_threads(2, {})[0] == max(1, cpus // 2)  # shared by the processes
    assert threads.cpu_threads(1000, {})[0] == 1
    assert threads.cpu_threads(1, {"OMP_NUM_THREADS": "junk"})[0] == cpus
    # never the load: the thread count changes the floats, so a busy machine must get the same count
    for load in (0.0, cpus / 2, cpus + 3.0, 100.0):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert threads.cpu_threads(1, {})[0] == cpus and threads.cpu_threads(2, {})[0] == max(1, cpus // 2)


def test_resume_thread_count_policy():
    assert threads.resume_threads(2, 2, "auto") == (2, "threads: 2 per process, as recorded in the checkpoint")
    n, line = threads.resume_threads(2, 1, "auto")  # another load, machine or launch chose 1: back to 2
    assert n == 2 and "as recorded in the checkpoint (this launch would have used 1)" in line
    n, line = threads.resume_threads(2, 1, "user")  # forced by the user: kept, and said to break bitwise
    assert n == 1 and line.startswith("warning: OMP_NUM_THREADS=1") and "will not be bitwise" in line
    n, line = threads.resume_threads(2, 1, "auto", same_world=False)  # 1 process -> 2: this launch's share of the CPUs
    assert n == 1 and "on another number of processes" in line
    n, line = threads.resume_threads(None, 3, "auto")  # a checkpoint from before the count was recorded
    assert n == 3 and "records no thread count" in line
    assert threads.threads_source({}) == "auto" and threads.threads_source({"OMP_NUM_THREADS": "4"}) == "user"
    assert threads.threads_source({"OMP_NUM_THREADS": "4", "SDLORA_THREADS_SOURCE": "auto"}) == "auto"  # run.py's own
