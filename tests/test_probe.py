"""The probe of remote shards (sdlora_ds/data/probe.py): once per process and once per node (the
ranks of a launch share one result), failures shared too."""
import multiprocessing
import os

import pytest

from data_fixtures import write_id_shards
from fault_http import FaultServer
from sdlora_ds.data import ShardIndex
from sdlora_ds.data.probe import TOKEN_ENV, _started, launch_token, result_path
from sdlora_ds.data.remote import ReadPolicy
from sdlora_ds.data.source import ShardOpenError

LAYOUT = {"train": [[(0, 4)], [(1, 4)]], "test": [[(0, 2), (1, 2)]]}


def _rank(q, path, url, local_rank):
    """A rank of a launch started by this test's process (LOCAL_RANK set, no inherited token)."""
    os.environ.pop(TOKEN_ENV, None)
    os.environ["LOCAL_RANK"] = str(local_rank)
    try:
        ShardIndex.load(path, shard_url=url, policy=ReadPolicy(retries=0))
        ShardIndex.load(path, shard_url=url, policy=ReadPolicy(retries=0))  # the Trainer after the preflight
        q.put((local_rank, "ok", launch_token()))
    except ShardOpenError as e:
        q.put((local_rank, str(e), launch_token()))


def _ranks(path, url, n=2):
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(q, path, url, r)) for r in range(n)]
    for p in procs:
        p.start()
    out = sorted(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    return out


def test_probed_once_per_process(tmp_path):
    root = str(tmp_path / "served")
    path, _ = write_id_shards(root, LAYOUT, num_classes=2)
    with FaultServer(root) as srv:
        for _ in range(3):  # launch/run.py's check, the preflight, the Trainer: one probe
            ShardIndex.load(path, shard_url=srv.base + "/{path}")
        assert len(srv.gets()) == 3  # one GET per remote shard
        # a result left half-written (a process killed while writing it) is probed again
        index = ShardIndex.load(path, shard_url=srv.base + "/{path}", probe=False)
        locations = [loc for s in index.splits for loc in index.shard_paths(s, range(2))]
        open(result_path(launch_token(), locations), "w").write('{"tok')
        ShardIndex.load(path, shard_url=srv.base + "/{path}")
        assert len(srv.gets()) == 6
        ShardIndex.load(path, shard_url=srv.base + "/{path}")
        assert len(srv.gets()) == 6


def test_ranks_of_a_launch_share_one_probe(tmp_path):
    root = str(tmp_path / "served")
    path, _ = write_id_shards(root, LAYOUT, num_classes=2)
    with FaultServer(root) as srv:
        out = _ranks(path, srv.base + "/{path}")
        parent = f"{os.getpid()}-{_started(os.getpid())}"  # the launcher: this process
        assert [o[1] for o in out] == ["ok", "ok"] and out[0][2] == out[1][2] == parent
        assert sorted(r[0] for r in srv.gets()) == ["/test/test-000000.tar", "/train/train-000000.tar",
                                                    "/train/train-000001.tar"]
        # a failure is shared as well: one rank asks, both stop with the same line
        os.remove(os.path.join(root, "train", "train-000001.tar"))
        n = len(srv.gets())
        out = _ranks(path, srv.base + "/nope/{path}")
        assert out[0][1] == out[1][1] and "HTTP 404" in out[0][1] and "nope/" in out[0][1]
        assert len(srv.gets()) - n == 2  # the first shard, then the last (is it all of them?): once


def test_the_prober_passes_its_token_to_processes_it_starts(tmp_path, monkeypatch):
    root = str(tmp_path / "served")
    path, _ = write_id_shards(root, LAYOUT, num_classes=2)
    monkeypatch.delenv(TOKEN_ENV)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with FaultServer(root) as srv:
        ShardIndex.load(path, shard_url=srv.base + "/{path}")
        assert os.environ[TOKEN_ENV] == f"{os.getpid()}-{_started(os.getpid())}"
    with pytest.raises(ShardOpenError):  # the server is gone, but a new token probes again
        monkeypatch.setenv(TOKEN_ENV, "another launch")
        ShardIndex.load(path, shard_url=srv.base + "/{path}", policy=ReadPolicy(retries=0))
