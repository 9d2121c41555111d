"""sdlora_ds.data.loader: exact and equal batch counts, exactly-once evaluation, determinism,
worker/rank splits, bad data, the task cache, and a real 2-process gloo epoch."""
import os
import shutil
import socket

import pytest
import torch

from data_fixtures import decode_ids, id_cfg, write_id_shards
from sdlora_ds.data import BadDataError, ShardIndex, TaskCache, build_loader

# Deliberately uneven: 7 shards from 1 to 23 samples, two holding several classes.
UNEVEN = {
    "train": [[(0, 23)], [(0, 4), (1, 9)], [(1, 1)], [(2, 17), (3, 5)], [(3, 11)], [(4, 2)], [(5, 13)]],
    "test": [[(0, 5), (1, 3)], [(2, 7)], [(3, 1), (4, 4)], [(5, 6)]],
}


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("uneven"))
    path, truth = write_id_shards(root, UNEVEN, num_classes=6)
    return ShardIndex.load(path, verify_checksums=True), truth


def run_ranks(index, cfg, world, **kw):
    """Iterate every rank's loader (simulated ranks). -> (lens, per-rank list of (ids, labels))."""
    lens, out = [], []
    for r in range(world):
        loader = build_loader(index, cfg, rank=r, world_size=world, **kw)
        ids, labels, nb = [], [], 0
        for x, y in loader:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16) and y.dtype == torch.int64
            ids += decode_ids(x)
            labels += y.tolist()
            nb += 1
        assert nb == len(loader), f"rank {r}: len(loader)={len(loader)} but yielded {nb}"
        lens.append(nb)
        out.append((ids, labels))
    return lens, out


@pytest.mark.parametrize("world,workers,batch", [(1, 0, 4), (2, 2, 4), (3, 2, 5), (4, 0, 3)])
def test_train_equal_counts_disjoint_and_labels(uneven, world, workers, batch):
    index, truth = uneven
    classes = [0, 1, 3, 5]
    n = index.count("train", classes)
    lens, out = run_ranks(index, id_cfg(), world, split="train", class_ids=classes, train=True,
                          batch_size=batch, seed=3, epoch=1, num_workers=workers)
    per_rank = n // world
    assert lens == [-(-per_rank // batch)] * world  # equal on every rank, exact
    all_ids = []
    for ids, labels in out:
        assert len(ids) == per_rank
        assert all(truth["train"][i] == y for i, y in zip(ids, labels))  # labels = original class ids
        all_ids += ids
    assert len(set(all_ids)) == len(all_ids)  # no sample twice in an epoch
    wanted = {i for i, c in truth["train"].items() if c in classes}
    assert set(all_ids) <= wanted and len(wanted) - len(all_ids) == n % world  # only the remainder rests


def test_eval_exactly_once_with_padding(uneven):
    index, truth = uneven
    classes = [0, 1, 2, 3, 4, 5]
    for world, workers in [(1, 0), (2, 2), (3, 0), (5, 2)]:
        lens, out = run_ranks(index, id_cfg(), world, split="test", class_ids=classes, train=False,
                              batch_size=4, seed=0, num_workers=workers)
        assert len(set(lens)) == 1
        real = [(i, y) for ids, labels in out for i, y in zip(ids, labels) if y >= 0]
        assert sorted(i for i, _ in real) == sorted(truth["test"])  # every test sample exactly once
        assert all(truth["test"][i] == y for i, y in real)
        pads = sum(1 for _, labels in out for y in labels if y < 0)
        assert pads == world * -(-len(truth["test"]) // world) - len(truth["test"])


def test_eval_order_is_deterministic_and_task_filtered(uneven):
    index, truth = uneven
    a = run_ranks(index, id_cfg(), 2, split="test", class_ids=[2, 4], train=False, batch_size=3, seed=0)[1]
    b = run_ranks(index, id_cfg(), 2, split="test", class_ids=[2, 4], train=False, batch_size=3, seed=9,
                  num_workers=2)[1]
    assert a == b
    assert {truth["test"][i] for ids, labels in a for i, y in zip(ids, labels) if y >= 0} == {2, 4}


def test_train_order_deterministic_per_epoch_and_worker_independent(uneven):
    index, _ = uneven
    kw = dict(split="train", class_ids=[0, 1, 2, 3], train=True, batch_size=4, seed=5)
    e0 = run_ranks(index, id_cfg(), 2, epoch=0, num_workers=0, **kw)[1]
    e0_again = run_ranks(index, id_cfg(), 2, epoch=0, num_workers=2, **kw)[1]
    e1 = run_ranks(index, id_cfg(), 2, epoch=1, num_workers=0, **kw)[1]
    assert e0 == e0_again  # same (seed, epoch) -> same order, whatever the worker count
    assert e0 != e1        # another epoch -> another order


def test_global_batches_do_not_depend_on_world_size(uneven):
    """Same global batch (batch_size x world_size) -> step s sees the same samples with the same
    random crops and flips on 1, 2 or 3 ranks: rank batches concatenated in rank order."""
    index, _ = uneven
    classes = [0, 1, 3, 5]
    assert index.count("train", classes) % 6 == 0  # 66: no remainder, so every step can be compared
    cfg = id_cfg(train_scale=[0.3, 1.0], train_ratio=[0.75, 1.33], interpolation="bilinear", hflip=True)
    per_world = {}
    for world in (1, 2, 3):
        ranks = [list(build_loader(index, cfg, split="train", class_ids=classes, train=True, batch_size=6 // world,
                                   rank=r, world_size=world, seed=2, epoch=3, num_workers=world % 2 * 2))
                 for r in range(world)]
        assert len({len(b) for b in ranks}) == 1
        per_world[world] = [(torch.cat([rk[s][0] for rk in ranks]), torch.cat([rk[s][1] for rk in ranks]))
                            for s in range(len(ranks[0]))]
    for world in (2, 3):
        assert len(per_world[world]) == len(per_world[1]) == 11
        for (x1, y1), (xw, yw) in zip(per_world[1], per_world[world]):
            assert torch.equal(y1, yw) and torch.equal(x1, xw)


def test_augmentation_reproducible_and_rng_untouched(uneven):
    index, _ = uneven
    cfg = id_cfg(train_scale=[0.2, 1.0], train_ratio=[0.75, 1.33], interpolation="bilinear", hflip=True)
    kw = dict(split="train", class_ids=[0, 2], train=True, batch_size=8, rank=0, world_size=1, seed=1, epoch=2)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = [x for x, _ in build_loader(index, cfg, num_workers=0, **kw)]
    after = torch.rand(1)
    assert torch.equal(before, after)  # the loader does not consume the caller's RNG
    b = [x for x, _ in build_loader(index, cfg, num_workers=2, **kw)]
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and len(a) == len(b)


def test_reads_only_task_shards(tmp_path):
    path, truth = write_id_shards(str(tmp_path), UNEVEN, num_classes=6)
    index = ShardIndex.load(path)
    assert index.shard_paths("train", [5]) == [os.path.join(str(tmp_path), "train", "train-000006.tar")]
    for p in index.shard_paths("train", range(6)):  # delete every shard except class 5's
        if not p.endswith("000006.tar"):
            os.remove(p)
    lens, out = run_ranks(index, id_cfg(), 1, split="train", class_ids=[5], train=True, batch_size=4, seed=0)
    assert sorted(out[0][0]) == sorted(i for i, c in truth["train"].items() if c == 5)


def test_cache_skips_tars_in_later_epochs(tmp_path):
    path, _ = write_id_shards(str(tmp_path), UNEVEN, num_classes=6)
    index = ShardIndex.load(path)
    kw = dict(split="train", class_ids=[0, 1, 3], train=True, batch_size=4, rank=1, world_size=2, seed=4)
    plain = [decode_ids(x) for x, _ in build_loader(index, id_cfg(), epoch=1, **kw)]
    cache = TaskCache()
    first = [decode_ids(x) for x, _ in build_loader(index, id_cfg(), epoch=0, cache=cache, **kw)]
    assert len(first) == len(plain)
    assert cache.nbytes > 0 and len(cache.items) == index.count("train", [0, 1, 3])  # the whole task split
    shutil.rmtree(os.path.join(str(tmp_path), "train"))  # later epochs must not need the tars
    cached = [decode_ids(x) for x, _ in build_loader(index, id_cfg(), epoch=1, cache=cache, num_workers=2, **kw)]
    assert cached == plain


def _corrupt_image(rows):
    key, cls, ext, data = rows[2]
    rows[2] = (key, cls, ext, data[:20] + b"garbage" * 10)
    return rows


def _drop_cls(rows):
    key, cls, ext, data = rows[1]
    rows[1] = (key, None, ext, data)
    return rows


def _out_of_range(rows):
    key, cls, ext, data = rows[0]
    rows[0] = (key, 99, ext, data)
    return rows


@pytest.mark.parametrize("tamper,needle", [(_corrupt_image, "does not decode"), (_drop_cls, "no .cls"),
                                           (_out_of_range, "class id 99 outside")])
def test_bad_sample_stops_with_shard_and_key(tmp_path, tamper, needle):
    path, truth = write_id_shards(str(tmp_path), {"train": [[(0, 6)], [(1, 6)]]}, num_classes=2,
                                  tamper={("train", 1): tamper})
    index = ShardIndex.load(path)
    kw = dict(split="train", class_ids=[0, 1], train=True, batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(BadDataError) as e:
        list(build_loader(index, id_cfg(), num_workers=2, **kw))
    msg = str(e.value)
    assert needle in msg and "train-000001.tar" in msg and "train_0001_" in msg and "tolerance=0" in msg
    # tolerated: the run goes on, counts stay exact, the bad slot holds a real sample of the task
    loader = build_loader(index, id_cfg(bad_sample_tolerance=1), num_workers=0, **kw)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    labels = torch.cat([y for _, y in batches])
    ids = [i for x, _ in batches for i in decode_ids(x)]
    assert len(labels) == 12 and (labels >= 0).all() and all(truth["train"][i] == int(y) for i, y in zip(ids, labels))


def test_bad_test_sample_becomes_padding_when_tolerated(tmp_path):
    path, truth = write_id_shards(str(tmp_path), {"test": [[(0, 5)], [(1, 4)]]}, num_classes=2,
                                  tamper={("test", 0): _corrupt_image})
    index = ShardIndex.load(path)
    lens, out = run_ranks(index, id_cfg(bad_sample_tolerance=1), 2, split="test", class_ids=[0, 1],
                          train=False, batch_size=2, seed=0)
    assert lens == [3, 3]
    real = sorted(i for ids, labels in out for i, y in zip(ids, labels) if y >= 0)
    assert len(real) == 8 and len(set(real)) == 8  # 9 samples, the corrupt one counted as padding


def test_truncated_shard(tmp_path):
    path, _ = write_id_shards(str(tmp_path), {"test": [[(0, 8)], [(1, 3)]]}, num_classes=2)
    shard = os.path.join(str(tmp_path), "test", "test-000000.tar")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2 + 100])  # cut inside a member
    index = ShardIndex.load(path)
    kw = dict(split="test", class_ids=[0, 1], train=False, batch_size=4, seed=0)
    with pytest.raises(BadDataError, match="test-000000.tar"):
        run_ranks(index, id_cfg(), 1, **kw)
    lens, out = run_ranks(index, id_cfg(bad_sample_tolerance=20), 2, **kw)
    assert lens == [2, 2]  # ceil(11 / 2) = 6 per rank, as the index says
    real = [i for ids, labels in out for i, y in zip(ids, labels) if y >= 0]
    assert 3 <= len(real) < 11 and len(set(real)) == len(real)  # what was readable, once


def test_cache_task_config_uses_module_cache(uneven):
    from sdlora_ds.data import clear_caches
    from sdlora_ds.data import loader as L
    index, _ = uneven
    clear_caches()
    kw = dict(split="train", class_ids=[3, 4], train=True, batch_size=4, rank=0, world_size=1, seed=0)
    a = [decode_ids(x) for x, _ in build_loader(index, id_cfg(cache_task=True), epoch=0, **kw)]
    cache = L._DEFAULT_CACHES[(index.path, "train")]
    assert len(cache.items) == index.count("train", [3, 4])
    b = [decode_ids(x) for x, _ in build_loader(index, id_cfg(), epoch=0, **kw)]
    assert a == b
    build_loader(index, id_cfg(cache_task=True), epoch=0, **{**kw, "class_ids": [5]})  # next task: refilled
    assert len(cache.items) == index.count("train", [5])
    clear_caches()


def test_more_samples_than_index_is_an_error(tmp_path):
    extra = lambda rows: rows + [(rows[0][0].replace("_0000_", "_0000_9"), 0, "png", rows[0][3])]
    path, _ = write_id_shards(str(tmp_path), {"train": [[(0, 4)]]}, num_classes=1, tamper={("train", 0): extra})
    index = ShardIndex.load(path)
    with pytest.raises(BadDataError, match="out of date"):
        list(build_loader(index, id_cfg(bad_sample_tolerance=5), split="train", class_ids=[0], train=True,
                          batch_size=2, rank=0, world_size=1, seed=0))


def test_too_few_samples_for_ranks(uneven):
    index, _ = uneven
    with pytest.raises(ValueError, match="fewer than world_size"):
        build_loader(index, id_cfg(), split="train", class_ids=[2], train=True, batch_size=2, rank=0,
                     world_size=64, seed=0)


# ----------------------------------------------------------------------------- real processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, index_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    index = ShardIndex.load(index_path)
    cfg = id_cfg(num_workers=2)
    steps = 0
    loader = build_loader(index, cfg, split="train", class_ids=[0, 1, 2, 3, 5], train=True, batch_size=3,
                          rank=rank, world_size=world, seed=7, epoch=0)
    for x, y in loader:  # one collective per batch: a rank with fewer batches would hang the other
        t = torch.tensor([float(y.numel())])
        dist.all_reduce(t)
        steps += 1
    ids = []
    for x, y in build_loader(index, cfg, split="test", class_ids=list(range(6)), train=False, batch_size=4,
                             rank=rank, world_size=world, seed=7):
        dist.all_reduce(torch.ones(1))
        ids += [i for i, lab in zip(decode_ids(x), y.tolist()) if lab >= 0]
    gathered = [None] * world
    dist.all_gather_object(gathered, ids)
    if rank == 0:
        with open(os.path.join(out_dir, "result.txt"), "w") as f:
            f.write(f"{steps} {len(loader)} {sorted(sum(gathered, []))}")
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_gloo_epoch_does_not_hang(uneven, tmp_path):
    index, truth = uneven
    port = _free_port()
    # fork: two real processes and a real gloo group, without re-importing torch in each (seconds)
    torch.multiprocessing.start_processes(_gloo_worker, args=(2, port, index.path, str(tmp_path)), nprocs=2,
                                          join=True, start_method="fork")
    steps, length, ids = open(tmp_path / "result.txt").read().split(" ", 2)
    assert int(steps) == int(length) > 0
    assert eval(ids) == sorted(truth["test"])


def test_bad_sample_in_a_shard_of_several_task_classes(tmp_path):
    """Training reads a multi-class shard once per class (order.py): a sample without .cls there
    is still reported with shard and key, and tolerated, the counts stay exact."""
    path, truth = write_id_shards(str(tmp_path), {"train": [[(0, 5), (1, 6)], [(2, 4)]]}, num_classes=3,
                                  tamper={("train", 0): _drop_cls})
    index = ShardIndex.load(path)
    kw = dict(split="train", class_ids=[0, 1, 2], train=True, batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(BadDataError, match=r"train-000000.tar key train_0000_000001: no .cls"):
        list(build_loader(index, id_cfg(), **kw))
    loader = build_loader(index, id_cfg(bad_sample_tolerance=2), num_workers=2, **kw)
    ids = [i for x, _ in loader for i in decode_ids(x)]
    assert len(ids) == 15 and len(loader) == 4 and all(i in truth["train"] for i in ids)


def test_samples_held_stay_within_the_stated_bound(tmp_path):
    """order.py's bound: a worker holds at most shuffle_buffer + batch_size read samples waiting for
    their batch, and with the task larger than the buffer, far fewer than the task."""
    path, _ = write_id_shards(str(tmp_path), {"train": [[(c, 60)] for c in range(10)]}, num_classes=10)
    index = ShardIndex.load(path)
    for world, rank in [(1, 0), (3, 2)]:
        loader = build_loader(index, id_cfg(shuffle_buffer=50), split="train", class_ids=range(10), train=True,
                              batch_size=8, rank=rank, world_size=world, seed=1, epoch=0)
        n = sum(len(y) for _, y in loader)
        assert n == 600 // world
        assert 8 <= loader.dataset.peak_held <= 50 + 8
