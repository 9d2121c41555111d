"""shards.writer and shards.pool: bad sources (one line, or skipped and recorded), a pool that stops
at once on a failure or Ctrl-C and records every shard finished so far, workers that die with their
parent, stale temporary files removed by the next run."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT
from shards import writer
from shards.writer import SampleSpec

TESTS = os.path.dirname(os.path.abspath(__file__))


def encode(source, options):
    """source = (kind, seconds): 'ok' sleeps then encodes, 'bad' sleeps then fails like a corrupt file."""
    kind, seconds = source
    time.sleep(seconds)
    if kind == "bad":
        raise ValueError("image 'x.jpg' is corrupt or not an image (truncated)")
    return "txt", f"{kind}{seconds}".encode()


def jobs(kinds):
    """One shard per entry of kinds: [(kind, seconds), ...] -> ShardJobs of one sample each."""
    samples = [SampleSpec(f"s{i:03d}", i, k, f"fp{i}") for i, k in enumerate(kinds)]
    return writer.plan_shards("train", samples, max_per_shard=1)


def state(out):
    path = os.path.join(out, writer.STATE_FILE)
    return json.load(open(path)) if os.path.exists(path) else {}


def test_bad_source_is_one_line_naming_sample_and_reason(tmp_path):
    with pytest.raises(writer.BadSample) as e:
        writer.convert(str(tmp_path), jobs([("ok", 0), ("bad", 0)]), encode, {}, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "s001" in msg and "corrupt" in msg and "--skip-bad" in msg, msg
    assert e.value.key == "s001"


def test_skip_bad_leaves_out_records_and_counts(tmp_path, capsys):
    out = str(tmp_path)
    samples = {"train": [SampleSpec("a", 0, ("ok", 0), "1"), SampleSpec("b", 0, ("bad", 0), "2"),
                         SampleSpec("c", 1, ("ok", 0), "3")]}
    path = writer.finish_conversion(out, "toy", ["x", "y"], samples, encode, {}, {}, {}, max_per_shard=10,
                                    skip_bad=True, progress=True)
    idx = json.load(open(path))
    assert idx["splits"]["train"]["per_class"] == [1, 1]
    assert idx["bad_samples"]["policy"] == "skip"
    assert [(b["split"], b["key"]) for b in idx["bad_samples"]["skipped"]] == [("train", "b")]
    assert "1 bad source file(s) left out" in capsys.readouterr().err
    from sdlora_ds.data import ShardIndex
    ShardIndex.load(path, verify_checksums=True)  # a valid index
    # without --skip-bad the shard that left something out is not reused: the file stops the run
    with pytest.raises(writer.BadSample):
        writer.finish_conversion(out, "toy", ["x", "y"], samples, encode, {}, {}, {}, max_per_shard=10,
                                 progress=False)
    idx2 = json.load(open(writer.finish_conversion(out, "toy", ["x", "y"], samples, encode, {}, {}, {},
                                                   max_per_shard=10, skip_bad=True, progress=False)))
    assert idx2 == idx


def test_pool_failure_stops_at_once_and_records_finished_shards(tmp_path):
    out = str(tmp_path)
    kinds = [("ok", 0), ("ok", 0), ("bad", 1.0), ("ok", 60), ("ok", 60), ("ok", 60)]
    before = {p.pid for p in psutil.Process().children()}
    start = time.time()
    with pytest.raises(writer.BadSample, match="s002"):
        writer.convert(out, jobs(kinds), encode, {}, workers=3, progress=False)
    assert time.time() - start < 20  # not the 60 s of the running shards
    assert {p.pid for p in psutil.Process().children()} <= before  # the workers are gone
    recorded = state(out)
    assert {"train/train-000000.tar", "train/train-000001.tar"} <= set(recorded)
    assert not {"train/train-000003.tar", "train/train-000004.tar"} & set(recorded)
    # a re-run resumes: the recorded shards are verified and kept, the rest written
    fixed = [("ok", 0)] * 2 + [("ok", 0)] * 4
    _, stats = writer.convert(out, jobs(fixed), encode, {}, workers=2, progress=False)
    assert stats["skipped"] >= 2 and stats["written"] + stats["skipped"] == 6


DRIVER = r"""
import os, signal, sys
# Ctrl-C as at a terminal: exec keeps an ignored or blocked SIGINT, so a disposition the test process
# picked up from an earlier test would reach this child and the converter would never see Ctrl-C.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT}})
sys.path[:0] = [{root!r}, {tests!r}]
from shards import writer
from test_writer import encode, jobs
kinds = [("ok", 0)] * 2 + [("ok", 120)] * 4
sys.exit(writer.run_cli(lambda: writer.convert({out!r}, jobs(kinds), encode, {{}}, workers=2, progress=False)))
"""


def start_driver(out):
    code = DRIVER.format(root=ROOT, tests=TESTS, out=out)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    end = time.time() + 120
    while time.time() < end:  # until the two quick shards are recorded and two workers are busy
        if len(state(out)) >= 2 and len(psutil.Process(proc.pid).children()) >= 2:
            return proc, [c.pid for c in psutil.Process(proc.pid).children()]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("driver did not start its shards")


def gone(pids, timeout=120.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_stops_the_pool_with_one_line_and_keeps_finished_shards(tmp_path):
    out = str(tmp_path)
    proc, workers = start_driver(out)
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say what the driver was doing, for the next reader
        status = [line.strip() for line in open(f"/proc/{proc.pid}/status") if line.startswith(("State", "Sig"))]
        here = [line.strip() for line in open("/proc/self/status") if line.startswith(("SigIgn", "SigBlk"))]
        workers = [c.pid for c in psutil.Process(proc.pid).children()]
        proc.kill()
        raise AssertionError(f"the converter did not stop on Ctrl-C within 120 s: driver {status}, test "
                             f"process {here}, pool workers {workers}")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().startswith("interrupted:"), stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert gone(workers)
    assert {"train/train-000000.tar", "train/train-000001.tar"} <= set(state(out))


def test_workers_die_with_their_parent_and_stale_temporaries_are_removed(tmp_path):
    out = str(tmp_path)
    proc, workers = start_driver(out)
    proc.kill()  # SIGKILL: no cleanup in the parent at all
    proc.wait()
    assert gone(workers), "pool workers outlived their parent"
    # what a killed run leaves: temporary files of a process that is gone (here: a finished one)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(out, "train", f"train-000004.tar.tmp{dead.pid}")
    open(stale, "wb").write(b"partial")
    live = os.path.join(out, "train", f"train-000005.tar.tmp{os.getppid()}")  # a live process: kept
    open(live, "wb").write(b"being written")
    quick = [("ok", 0)] * 6
    _, stats = writer.convert(out, jobs(quick), encode, {}, progress=False)
    assert not os.path.exists(stale) and os.path.exists(live)
    assert stats["stale_removed"] >= 1 and stats["skipped"] >= 2
    os.remove(live)
