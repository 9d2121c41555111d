"""Shards read through webdataset's openers: a local HTTP server on 127.0.0.1, `pipe:cat`, file:,
and a URL that cannot be opened (one error line naming it). The same loader output as local
paths, bad-data accounting and exactly-once evaluation included."""
import functools
import http.server
import os
import threading

import pytest
import torch

from data_fixtures import decode_ids, epoch_batches, id_cfg, write_id_shards
from sdlora_ds.data import BadDataError, ShardIndex, build_loader
from sdlora_ds.data import reader as R
from sdlora_ds.data.reader import ShardReadError
from sdlora_ds.data.remote import ReadPolicy
from sdlora_ds.data.source import ShardOpenError

LAYOUT = {"train": [[(0, 9)], [(1, 4), (2, 7)], [(3, 11)]], "test": [[(0, 3), (1, 2)], [(2, 4), (3, 3)]]}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a reader closing early resets the connection
        pass


FAST = ReadPolicy(retries=1, retry_wait=0.01, timeout=30)  # a failing read gives up at once


@pytest.fixture
def http_root(tmp_path):
    """(shard folder served at http://127.0.0.1:PORT/, base URL); the server stops after the test."""
    root = str(tmp_path / "served")
    os.makedirs(root)
    server = _Server(("127.0.0.1", 0), functools.partial(_Quiet, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("kind", ["http", "pipe", "file", "stream_local"])
def test_urls_give_the_same_batches_as_local_paths(http_root, kind, monkeypatch):
    root, base = http_root
    path, truth = write_id_shards(root, LAYOUT, num_classes=4)
    local = ShardIndex.load(path, verify_checksums=True)
    want_train = epoch_batches(local, id_cfg(), "train", True)
    want_test = epoch_batches(local, id_cfg(), "test", False)
    template = {"http": base + "/{path}", "pipe": f"pipe:cat {root}/{{path}}", "file": f"file:{root}/{{path}}",
                "stream_local": ""}[kind]
    if kind == "stream_local":  # local files through webdataset's tar iteration instead of the seek path
        monkeypatch.setattr(R, "SEEK_LOCAL", False)
    index = ShardIndex.load(path, verify_checksums=True, shard_url=template)
    cfg = id_cfg()  # the loader reads where the index was told (ShardIndex.load(shard_url=))
    if template:
        assert index.shard_paths("train", [3], template)[0] == template.replace("{path}", "train/train-000002.tar")
    assert epoch_batches(index, cfg, "train", True, workers=2) == want_train
    test = epoch_batches(index, cfg, "test", False)
    assert test == want_test
    real = sorted(i for rank in test for ids, ys in rank for i, y in zip(ids, ys) if y >= 0)
    assert real == sorted(truth["test"])  # exactly once over the ranks


def test_urls_written_in_the_index(http_root):
    """An index whose entries are URLs themselves (no template)."""
    import json
    root, base = http_root
    path, _ = write_id_shards(root, LAYOUT, num_classes=4)
    want = epoch_batches(ShardIndex.load(path), id_cfg(), "train", True)
    raw = json.load(open(path))
    for split, s in raw["splits"].items():
        for sh in s["shards"]:
            sh["path"] = f"{base}/{sh['path']}" if split == "train" else f"pipe:cat {root}/{sh['path']}"
    other = os.path.join(os.path.dirname(root), "elsewhere")
    os.makedirs(other)
    moved = os.path.join(other, "index.json")
    json.dump(raw, open(moved, "w"))
    index = ShardIndex.load(moved, verify_checksums=True)  # nothing local to hash: loads
    assert epoch_batches(index, id_cfg(), "train", True) == want
    assert len([y for rk in epoch_batches(index, id_cfg(), "test", False) for _, ys in rk for y in ys if y >= 0]) == 12


@pytest.mark.parametrize("kind", ["http404", "refused", "pipe_fails", "unknown_scheme"])
def test_unopenable_url_is_one_line_naming_it(http_root, kind, tmp_path):
    root, base = http_root
    path, _ = write_id_shards(root, LAYOUT, num_classes=4)
    template = {"http404": base + "/nope/{path}", "refused": "http://127.0.0.1:9/{path}",
                "pipe_fails": "pipe:cat /nonexistent/{path}", "unknown_scheme": "s3://bucket/{path}"}[kind]
    with pytest.raises(ShardOpenError) as e:
        ShardIndex.load(path, shard_url=template, policy=FAST)
    msg = str(e.value)
    assert "\n" not in msg and template.replace("{path}", "") in msg
    assert {"http404": "HTTP error", "refused": "could not connect", "pipe_fails": "exit status 1",
            "unknown_scheme": "pipe:aws s3 cp"}[kind] in msg
    if kind == "unknown_scheme":
        return
    # unprobed (e.g. the server went away mid-run): the worker stops with one line naming it, bad
    # data whatever the tolerance (exit 2 in a run)
    index = ShardIndex.load(path, shard_url=template, probe=False)
    with pytest.raises(ShardReadError, match="cannot read shard '" + template.split("{")[0]) as e:
        epoch_batches(index, id_cfg(bad_sample_tolerance=100, retries=1, retry_wait=0.01), "train", True, world=1)
    assert "\n" not in str(e.value)


def test_bad_sample_named_by_url(http_root):
    root, base = http_root

    def drop_cls(rows):
        key, cls, ext, data = rows[1]
        rows[1] = (key, None, ext, data)
        return rows
    path, _ = write_id_shards(root, {"train": [[(0, 6)], [(1, 6)]]}, num_classes=2, tamper={("train", 1): drop_cls})
    index = ShardIndex.load(path, shard_url=base + "/{path}")
    with pytest.raises(BadDataError) as e:
        epoch_batches(index, id_cfg(), "train", True, world=1, classes=(0, 1))
    assert f"{base}/train/train-000001.tar" in str(e.value) and "train_0001_" in str(e.value)
    assert "no .cls" in str(e.value)
    batches = epoch_batches(index, id_cfg(bad_sample_tolerance=1), "train", True, world=1, classes=(0, 1))
    assert sum(len(ids) for ids, _ in batches[0]) == 12


def test_truncated_stream_is_bad_data_not_an_open_error(http_root):
    root, base = http_root
    path, _ = write_id_shards(root, {"test": [[(0, 8)], [(1, 3)]]}, num_classes=2)
    shard = os.path.join(root, "test", "test-000000.tar")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2 + 100])
    index = ShardIndex.load(path, shard_url=base + "/{path}")
    with pytest.raises(BadDataError, match="test-000000.tar"):
        epoch_batches(index, id_cfg(), "test", False, world=1, classes=(0, 1))
    # tolerated samples do not excuse the shard's bytes: with data.verify_checksums they differ from the index's
    with pytest.raises(ShardReadError, match="test-000000.tar' has sha256 .* the index says"):
        epoch_batches(index, id_cfg(bad_sample_tolerance=20), "test", False, world=1, classes=(0, 1))
    out = epoch_batches(index, id_cfg(bad_sample_tolerance=20, verify_checksums=False), "test", False, world=2,
                 classes=(0, 1))
    assert [len(r) for r in out] == [2, 2]


def test_resume_mid_epoch_over_http(http_root):
    root, base = http_root
    path, _ = write_id_shards(root, LAYOUT, num_classes=4)
    index = ShardIndex.load(path, shard_url=base + "/{path}")
    kw = dict(split="train", class_ids=[0, 1, 2, 3], train=True, batch_size=4, rank=0, world_size=1, seed=2, epoch=3)
    full = [(decode_ids(x), y) for x, y in build_loader(index, id_cfg(), **kw)]
    resumed = [(decode_ids(x), y) for x, y in build_loader(index, id_cfg(), start_batch=3, num_workers=2, **kw)]
    assert len(full) == 8 and [a for a, _ in resumed] == [a for a, _ in full[3:]]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(resumed, full[3:]))
