"""Remote reads under injected faults (sdlora_ds/data/remote.py), on a fault-injecting HTTP server on
127.0.0.1 (fault_http.py) and through `pipe:`: a connection cut mid-shard (with and without Range
support), a 503 for the first try and a stalled read that times out give exactly the batches of
local files; altered bytes, a missing shard and a store that stays down are one line naming the
URL, as bad data (exit 2 in a run). Retries are counted across DataLoader workers."""
import hashlib
import os
import re

import pytest

from data_fixtures import epoch_batches, id_cfg, write_id_shards
from fault_http import FaultServer
from sdlora_ds.data import ShardIndex
from sdlora_ds.data.reader import ShardReadError
from sdlora_ds.data.remote import ReadPolicy, RemoteReadFailed, RemoteStream, retry_count

LAYOUT = {"train": [[(0, 9)], [(1, 4), (2, 7)], [(3, 11)]], "test": [[(0, 3), (1, 2)], [(2, 4), (3, 3)]]}
TRAIN = ["/train/train-000000.tar", "/train/train-000001.tar", "/train/train-000002.tar"]


@pytest.fixture
def shards(tmp_path):
    """(served folder, local index path, the local run's train and test batches)."""
    root = str(tmp_path / "served")
    path, _ = write_id_shards(root, LAYOUT, num_classes=4)
    local = ShardIndex.load(path, verify_checksums=True)
    return root, path, epoch_batches(local, id_cfg(), "train", True), epoch_batches(local, id_cfg(), "test", False)


def cfg(**over):
    return id_cfg(**{"retries": 3, "retry_wait": 0.01, "read_timeout": 60.0, **over})


@pytest.mark.parametrize("fault,honor_range,workers", [("cut", True, 2), ("cut", False, 0), ("503", True, 0),
                                                       ("stall", True, 0)])
def test_transient_faults_give_the_batches_of_local_files(shards, fault, honor_range, workers):
    root, path, want_train, want_test = shards
    with FaultServer(root, honor_range=honor_range) as srv:
        index = ShardIndex.load(path, shard_url=srv.base + "/{path}")  # the probe: before the faults
        # stall: one shard, the server never answers that read again; 2 s without data fails the attempt
        hit = TRAIN[:1] if fault == "stall" else TRAIN + ["/test/test-000000.tar"]
        for p in hit:
            srv.faults[p] = [fault]
        before = retry_count()
        c = cfg(read_timeout=2.0) if fault == "stall" else cfg()
        assert epoch_batches(index, c, "train", True, workers=workers) == want_train
        assert epoch_batches(index, c, "test", False) == want_test
        assert retry_count() - before == len(hit)  # each fault retried once, counted in the workers too
        if fault in ("cut", "stall"):  # the retry asked for the rest, from the byte reached
            resumed = [r for r in srv.gets() if r[1]]
            assert len(resumed) == len(hit) and all(r[2] == (206 if honor_range else 200) for r in resumed)
            assert all(int(r[1].split("=")[1].rstrip("-")) > 0 for r in resumed)


def test_a_resumed_read_is_hashed_across_the_resume(shards):
    """The whole shard's sha256 from the first part and the resumed rest (no byte hashed twice)."""
    root, *_ = shards
    data = open(os.path.join(root, TRAIN[1].lstrip("/")), "rb").read()
    sha = hashlib.sha256(data).hexdigest()
    for honor in (True, False):
        with FaultServer(root, honor_range=honor) as srv:
            srv.faults[TRAIN[1]] = ["cut", "cut"]
            s = RemoteStream(srv.base + TRAIN[1], ReadPolicy(retries=2, retry_wait=0.01), sha)
            got = b""
            while len(got) < 1000:  # a reader that stops early: finish() reads and hashes the rest
                got += s.read(1000 - len(got))
            s.finish()
            assert s.pos == len(data) and s.retried == 2 and s.hash.hexdigest() == sha
            s = RemoteStream(srv.base + TRAIN[1], ReadPolicy(retries=0), "0" * 64)
            with pytest.raises(RemoteReadFailed, match="has sha256"):
                s.finish()


def test_altered_bytes_are_bad_data_naming_the_url(shards):
    root, path, *_ = shards
    with FaultServer(root) as srv:
        index = ShardIndex.load(path, shard_url=srv.base + "/{path}")
        srv.faults[TRAIN[2]] = ["alter"]
        with pytest.raises(ShardReadError) as e:  # whatever the tolerance: the shard is not the converted one
            epoch_batches(index, cfg(bad_sample_tolerance=1000), "train", True, world=1, workers=2)
        msg = str(e.value)  # raised in a DataLoader worker, still one line
        assert "\n" not in msg and msg.startswith(f"shard '{srv.base}{TRAIN[2]}' has sha256")
        assert "the index says" in msg
        # not checked when data.verify_checksums is off (the altered byte is in the padding after the
        # first .cls member: the samples still read)
        epoch_batches(index, cfg(bad_sample_tolerance=1000, verify_checksums=False), "train", True, world=1)


def test_missing_shard_is_not_retried(shards):
    root, path, *_ = shards
    with FaultServer(root) as srv:
        index = ShardIndex.load(path, shard_url=srv.base + "/{path}")
        os.rename(os.path.join(root, TRAIN[0].lstrip("/")), os.path.join(root, "gone.tar"))  # deleted mid-run
        before = retry_count()
        with pytest.raises(ShardReadError) as e:
            epoch_batches(index, cfg(), "train", True, world=1)
        msg = str(e.value)
        assert "\n" not in msg and f"cannot read shard '{srv.base}{TRAIN[0]}'" in msg and "HTTP 404" in msg
        assert "not retried" in msg and retry_count() == before
        assert [r for r in srv.gets(404)] == [(TRAIN[0], None, 404)]


def test_a_store_that_stays_down_fails_after_the_retries(shards):
    root, path, *_ = shards
    with FaultServer(root) as srv:
        index = ShardIndex.load(path, shard_url=srv.base + "/{path}")
        srv.faults["*"] = ["503"] * 100
        before = retry_count()
        with pytest.raises(ShardReadError) as e:
            epoch_batches(index, cfg(retries=2), "train", True, world=1)
        msg = str(e.value)
        assert "\n" not in msg and re.search(f"cannot read shard '{srv.base}/train/train-00000[0-2].tar': 3 tries", msg)
        assert "data.retries=2" in msg and "HTTP 503" in msg and retry_count() - before == 2
        assert len(srv.gets(503)) == 3


def test_pipe_is_rerun_and_skips_what_it_delivered(shards, tmp_path):
    """A command that breaks after part of the shard (exit 1) the first time: rerun, its first bytes dropped."""
    root, path, want_train, want_test = shards
    script = tmp_path / "flaky.sh"
    # mkdir is atomic: of the two workers that stream each shard, exactly one run of the command breaks
    script.write_text('f="$1"\nif mkdir "$f.failed" 2>/dev/null; then head -c 3000 "$f"; exit 1; else cat "$f"; fi\n')
    index = ShardIndex.load(path, shard_url=f"pipe:sh {script} {root}/{{path}}", probe=False)
    before = retry_count()
    assert epoch_batches(index, cfg(), "train", True, workers=2) == want_train
    assert epoch_batches(index, cfg(), "test", False) == want_test
    assert retry_count() - before == 5  # each of the 5 shards broke once
    # a command that always fails: one line with its exit status after the retries
    index = ShardIndex.load(path, shard_url=f"pipe:cat {root}/nope/{{path}}", probe=False)
    with pytest.raises(ShardReadError, match=r"cannot read shard 'pipe:cat .*/nope/train/train-00000[0-2].tar': "
                                             r"2 tries.*command exit status 1"):
        epoch_batches(index, cfg(retries=1), "train", True, world=1)


def test_a_stalled_pipe_times_out_and_is_rerun(shards, tmp_path):
    """The command goes quiet after part of the shard (the first time): after data.read_timeout
    without a byte it is killed and run again."""
    root, path, want_train, _ = shards
    script = tmp_path / "stall.sh"
    script.write_text('f="$1"; m="$f.stalled"\nif [ -e "$m" ]; then cat "$f"; else touch "$m"; '
                      'head -c 3000 "$f"; sleep 6017; fi\n')
    one = TRAIN[1].lstrip("/")
    index = ShardIndex.load(path, shard_url=f"pipe:sh {script} {root}/{{path}}", probe=False)
    for other in ("train/train-000000.tar", "train/train-000002.tar", "test/test-000000.tar", "test/test-000001.tar"):
        open(os.path.join(root, other + ".stalled"), "w").close()  # only `one` stalls
    before = retry_count()
    assert epoch_batches(index, cfg(read_timeout=2.0), "train", True) == want_train
    assert retry_count() - before == 1 and os.path.exists(os.path.join(root, one + ".stalled"))
    orphans = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p) == "sleep\x006017"]
    assert not orphans  # the stalled command was killed with its shell


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read().rstrip("\0")
    except OSError:
        return ""


def test_index_json_read_over_http(shards):
    """data.index may be a URL: relative shard paths are then relative to its folder; a 503 is retried."""
    root, path, want_train, _ = shards
    with FaultServer(root, honor_range=False) as srv:
        srv.faults["/index.json"] = ["503", "cut"]
        index = ShardIndex.load(srv.base + "/index.json", verify_checksums=True,
                                policy=ReadPolicy(retries=2, retry_wait=0.01))
        assert index.path == srv.base + "/index.json"
        assert index.shard_paths("train", [3]) == [srv.base + TRAIN[2]]
        assert epoch_batches(index, cfg(), "train", True) == want_train
        with pytest.raises(ValueError, match="cannot read shard index '.*/nope.json': at byte 0: HTTP 404"):
            ShardIndex.load(srv.base + "/nope.json")


def test_read_policy_config_fields():
    from sdlora_ds.config import ConfigError
    for field, value in [("retries", -1), ("retry_wait", -0.5), ("read_timeout", 0)]:
        with pytest.raises(ConfigError, match=f"config field 'data.{field}'"):
            id_cfg(**{field: value}).validate("data")
    p = ReadPolicy(retries=9, retry_wait=1.0)
    import random
    waits = [p.wait(i, random.Random(0)) for i in range(1, 10)]
    assert 1.0 <= waits[0] <= 1.25 and 2.0 <= waits[1] <= 2.5 and all(w <= 75.0 for w in waits)


def test_a_page_that_is_not_a_tar_is_bad_data_naming_the_url(shards):
    root, path, *_ = shards
    with FaultServer(root) as srv:
        index = ShardIndex.load(path, shard_url=srv.base + "/{path}")
        open(os.path.join(root, TRAIN[1].lstrip("/")), "wb").write(b"<html>maintenance</html>\n" * 40)
        with pytest.raises(ShardReadError, match=f"cannot open shard '{srv.base}{TRAIN[1]}'.*tar t"):
            epoch_batches(index, cfg(), "train", True, world=1)
