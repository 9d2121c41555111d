"""Per-task data streams over the shards: exact, equal batch counts on every rank.

`build_loader(index, cfg, split=, class_ids=, train=, batch_size=, rank=, world_size=, seed=,
epoch=, start_batch=)` returns a DataLoader of (images float32 (B, 3, S, S), labels int64 (B,)),
labels being the index's class ids. Build one per epoch; start_batch=k resumes mid-epoch at the
rank's batch k without decoding the first k.

- Train: one global order per (seed, epoch), shared by all ranks (order.py): sources interleaved at
  random, then a shuffle buffer. Global batches of batch_size x world_size, each rank a fixed slice,
  so a step sees the same samples on 1 or 8 ranks; the last N % world_size samples rest the epoch.
- Eval: rank r takes positions p % world_size == r, padded with label -1 (ignored) to equal counts.
- Workers build batches w, w + W, ...: the batch order does not depend on the worker count.
  Augmentation is seeded per sample from (seed, epoch, position).
- Bad data (`BadDataError`, naming shard and key) counts against data.bad_sample_tolerance; a
  tolerated sample keeps its slot so batch counts stay exact. An unopenable shard is `ShardOpenError`.
- `TaskCache` (data.cache_task): the task split read once per rank, inherited by forked workers.
- Remote shards are retried and resumed at the byte reached, and hashed as they stream (remote.py).

The full contract (stream sources, slicing, memory bounds, every bad-data case): docs/data_loading.md.
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sdlora_ds.data.decode import require_cuda, wrap_for_device
from sdlora_ds.data.index import ShardIndex
from sdlora_ds.data.order import epoch_order
from sdlora_ds.data.reader import BadDataError, BadCounter, SampleRec, scan_shard, ShardRef
from sdlora_ds.data.remote import ReadPolicy
from sdlora_ds.data.source import local_path
from sdlora_ds.data.transforms import build_transform

__all__ = ["BadDataError", "TaskCache", "build_loader", "clear_caches"]


def _own_ks(sh: ShardRef, rank: int, world: int) -> range:
    """Positions k in the shard owned by `rank`: (sh.start + k) % world == rank."""
    return range((rank - sh.start) % world, sh.count, world)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class TaskCache:
    """The encoded samples of one task split, kept in memory across the epochs of a task.

    Pass the same object to every build_loader call of the task (train split). It is filled by the
    first call (one read of the task's shards in the calling process); workers inherit it."""

    def __init__(self):
        self.key: Optional[tuple] = None
        self.items: dict[tuple[int, int], SampleRec] = {}
        self.nbytes = 0

    def clear(self) -> None:
        self.key, self.items, self.nbytes = None, {}, 0

    def _fill(self, key: tuple, shards: list, keep: frozenset, num_classes: int,
              on_bad: Callable[..., None], policy: ReadPolicy) -> None:
        self.clear()
        for si, sh in enumerate(shards):
            for rec in scan_shard(si, sh, sh.keep, num_classes, lambda k: True, sh.count - 1, on_bad, policy):
                self.items[(si, rec.k)] = rec
                self.nbytes += len(rec.data or b"")
        self.key = key


class _TaskStream(IterableDataset):
    """Yields whole batches (images (B, 3, S, S), labels (B,)); see the module docstring."""

    def __init__(self, index: ShardIndex, cfg, split: str, class_ids: Sequence[int], train: bool,
                 batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 cache: Optional[TaskCache], start_batch: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in 0..world_size-1 (world_size={world_size})")
        self.keep = frozenset(int(c) for c in class_ids)
        self.split, self.train, self.batch_size = split, train, batch_size
        self.rank, self.world, self.seed, self.epoch = rank, world_size, seed, epoch
        self.num_classes = index.num_classes
        self.image_size = cfg.image_size
        self.shuffle_buffer = cfg.shuffle_buffer
        self.tolerance = cfg.bad_sample_tolerance
        self.transform = build_transform(cfg, train)
        self.policy = ReadPolicy.from_config(cfg, rank)
        sums = index.checksums(split) if cfg.verify_checksums else {}
        # eval: one source per shard (read once); train: one per (shard, task class), see order.py
        self.shards: list[ShardRef] = []
        start = 0
        for path, n, per in index.shards(split, self.keep):
            mine = sorted(c for c in per if c in self.keep)
            groups = [frozenset(mine)] if not train else [frozenset([c]) for c in mine]
            for cls in groups:
                count = sum(per[c] for c in cls)
                sha = sums.get(path, "") if local_path(path) is None else ""  # local ones: checked at load
                self.shards.append(ShardRef(path, count, frozenset(per), start, cls, sha))
                start += count
        self.total = start  # N: task samples in the split
        if self.total != index.count(split, self.keep):  # per-shard and per-split counts disagree
            raise ValueError(f"shard index {index.path!r}: split {split!r} per_class counts and shard "
                             f"counts disagree for classes {sorted(self.keep)[:8]}; re-run the converter")
        if train:
            self.n = self.total // world_size  # samples per rank
            if self.n == 0:
                raise ValueError(f"split {split!r} holds {self.total} samples of classes "
                                 f"{sorted(self.keep)[:8]}..., fewer than world_size={world_size} ranks")
        else:
            self.n = math.ceil(self.total / world_size)
        self.num_batches = math.ceil(self.n / batch_size)
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch={start_batch}: this stream has {self.num_batches} batches")
        self.start_batch = start_batch  # batches before it are skipped unread (resume mid-epoch)
        self.cache = cache
        if cache is not None:
            key = (index.path, split, tuple(sorted(self.keep)))
            if cache.key != key:
                cache._fill(key, self.shards, self.keep, self.num_classes, BadCounter(self.tolerance).add,
                            self.policy)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    # ------------------------------------------------------------------ planning
    def _plan(self) -> tuple[tuple, list[list[int]], Optional[list[list[int]]]]:
        """(items, batches, positions): items = (src, k) arrays, the input sequence in reading order
        (sample k of source src; src -1 = eval padding); batches[j] = input positions of the rank's
        batch j; positions[j] = their global output positions (train: they seed the augmentation),
        None for eval."""
        B, world, r = self.batch_size, self.world, self.rank
        if not self.train:
            own = [(si, k) for si, sh in enumerate(self.shards) for k in _own_ks(sh, r, world)]
            pad = self.n - len(own)  # padding positions: source -1
            src = np.asarray([si for si, _ in own] + [-1] * pad, dtype=np.int32)
            ks = np.asarray([k for _, k in own] + [-1] * pad, dtype=np.int32)
            return (src, ks), [list(range(j * B, min((j + 1) * B, self.n))) for j in range(self.num_batches)], None
        src, ks, out_to_in = epoch_order([sh.count for sh in self.shards], self.seed, self.epoch,
                                         self.shuffle_buffer)
        items = (src, ks)
        used = self.n * world  # N': the last N % world of the global order rest this epoch
        G = B * world
        full = used // G
        tail = (used - full * G) // world  # per-rank share of a short last global batch
        positions = [list(range(s * G + r * B, s * G + (r + 1) * B)) for s in range(full)]
        if tail:
            positions.append(list(range(full * G + r * tail, full * G + (r + 1) * tail)))
        assert len(positions) == self.num_batches and sum(map(len, positions)) == self.n
        return items, [[int(out_to_in[q]) for q in qs] for qs in positions], positions

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        items, batches, positions = self._plan()
        # worker w takes batches start+w, start+w+W, ...: the DataLoader's round-robin over workers
        # then yields start, start+1, ... in order, whatever W
        my_batches = range(self.start_batch + wid, self.num_batches, nw)
        needed_in = sorted(i for j in my_batches for i in batches[j])
        bad = BadCounter(self.tolerance)
        source = self._records(items, needed_in, bad.add)
        pending: dict[int, Optional[SampleRec]] = {}
        self.peak_held = 0
        last_good: Optional[tuple[torch.Tensor, int]] = None
        for j in my_batches:
            recs = []
            for i in batches[j]:
                while i not in pending:
                    pos, rec = next(source)
                    pending[pos] = rec
                self.peak_held = max(self.peak_held, len(pending))  # the memory bound of order.py
                recs.append(pending.pop(i))
            seeds = [_seed(self.seed, self.epoch, q, 3) for q in positions[j]] if positions else None
            images, labels, last_good = self._batch(recs, seeds, bad, last_good)
            yield images, labels
        for _ in source:  # nothing should be left; closes the sources
            pass

    def _records(self, items, needed_in: list[int], on_bad) -> Iterator[tuple[int, Optional[SampleRec]]]:
        """(input position, record) for every needed input position, in input (reading) order.
        All sources are open at once and each is advanced as the interleave asks (order.py); a
        source is closed once its last needed sample is read."""
        src, ks = items
        last: dict[int, int] = {}
        want: dict[int, set[int]] = {}
        for i in needed_in:
            si = int(src[i])
            if si >= 0:
                last[si] = max(last.get(si, -1), int(ks[i]))
                want.setdefault(si, set()).add(int(ks[i]))
        scans: dict[int, Iterator[SampleRec]] = {}
        try:
            for i in needed_in:
                si, k = int(src[i]), int(ks[i])
                if si < 0:  # eval padding: nothing to read
                    yield i, None
                    continue
                if self.cache is not None:
                    yield i, self.cache.items[(si, k)]
                    continue
                if si not in scans:
                    sh = self.shards[si]
                    scans[si] = scan_shard(si, sh, sh.keep, self.num_classes, want[si].__contains__, last[si],
                                           on_bad, self.policy)
                for rec in scans[si]:
                    if rec.k == k:
                        break
                else:
                    raise AssertionError(f"source {si} ended before sample {k}")  # scan_shard yields count
                yield i, rec
                if k == last[si]:  # finish the scan: a shard with samples the index does not know raises
                    for _ in scans.pop(si):
                        pass
        finally:
            for it in scans.values():
                it.close()

    def _decode(self, rec: SampleRec, bad: "BadCounter") -> Optional[torch.Tensor]:
        if rec.bad is not None:
            if not rec.key.startswith("<missing"):  # missing ones were reported by the scan
                bad.add(self.shards[rec.shard].path, rec.key, rec.bad)
            return None
        try:
            # float32 (3, S, S); the transform decodes the bytes itself (JPEGs at reduced scale when
            # the crop allows it: sdlora_ds/data/transforms.py)
            return self.transform(rec.data)
        except Exception as e:  # PIL raises many types for corrupt data; name the sample instead
            bad.add(self.shards[rec.shard].path, rec.key, f"image does not decode: {type(e).__name__}: {e}")
            return None

    def _batch(self, recs: list, seeds: Optional[list[int]], bad: "BadCounter", last_good):
        s = self.image_size
        imgs: list[Optional[torch.Tensor]] = []
        labels: list[int] = []
        with torch.random.fork_rng(devices=[]):
            for n, rec in enumerate(recs):
                if rec is None:  # eval padding
                    imgs.append(torch.zeros(3, s, s))
                    labels.append(-1)
                    continue
                if seeds is not None:
                    # the CPU generator only: torch.manual_seed would also reseed CUDA, which
                    # fork_rng(devices=[]) does not restore
                    torch.random.default_generator.manual_seed(seeds[n])
                x = self._decode(rec, bad)
                imgs.append(x)
                labels.append(rec.label if x is not None else -1)
        if any(x is None for x in imgs):
            self._substitute(imgs, labels, last_good, recs)
        good = [(x, y) for x, y in zip(imgs, labels) if y >= 0]
        if good:
            last_good = good[-1]
        collate = getattr(self.transform, "collate", torch.stack)  # data.decode 'cuda': encoded samples
        return collate(imgs), torch.tensor(labels, dtype=torch.int64), last_good

    def _substitute(self, imgs, labels, last_good, recs) -> None:
        """Fill tolerated bad slots: eval -> label -1 padding; train -> a copy of a good sample."""
        s = self.image_size
        good = [i for i, (x, y) in enumerate(zip(imgs, labels)) if x is not None and y >= 0]
        for i, x in enumerate(imgs):
            if x is not None:
                continue
            if not self.train:
                imgs[i], labels[i] = torch.zeros(3, s, s), -1
            elif good:
                src = min(good, key=lambda g: abs(g - i))
                imgs[i], labels[i] = imgs[src].clone(), labels[src]
            elif last_good is not None:
                imgs[i], labels[i] = last_good[0].clone(), last_good[1]
            else:
                r = recs[i]
                raise BadDataError(f"shard {self.shards[r.shard].path} key {r.key}: bad sample tolerated but no "
                                   f"good sample to stand in for it yet (a whole batch is bad)")


_DEFAULT_CACHES: dict[tuple[str, str], TaskCache] = {}


def clear_caches() -> None:
    """Drop the caches build_loader keeps for data.cache_task when no cache is passed."""
    _DEFAULT_CACHES.clear()


def build_loader(index: ShardIndex, cfg, *, split: str, class_ids: Sequence[int], train: bool,
                 batch_size: int, rank: int, world_size: int, seed: int, epoch: int = 0,
                 num_workers: Optional[int] = None, cache: Optional[TaskCache] = None,
                 start_batch: int = 0) -> DataLoader:
    """DataLoader of (images float32 (B, 3, S, S), labels int64 (B,)) for one task split on one rank.

    cfg: sdlora_ds.config.DataConfig. len(loader) is exact and equal on every rank. `cache`: a
    TaskCache kept by the caller across the epochs of one task; when None and cfg.cache_task is set,
    training streams use a module-level cache per (index, split), refilled when the task changes."""
    if cfg.decode == "cuda":
        require_cuda()  # before any work: no silent CPU fallback
    if cache is None and cfg.cache_task and train:
        cache = _DEFAULT_CACHES.setdefault((index.path, split), TaskCache())
    ds = _TaskStream(index, cfg, split, class_ids, train, batch_size, rank, world_size, seed, epoch, cache,
                     start_batch)
    nw = cfg.num_workers if num_workers is None else num_workers
    # Own generator: the DataLoader draws its worker base seed from it, not from the caller's RNG.
    gen = torch.Generator().manual_seed(_seed(seed, epoch, rank, 4))
    # Workers are forked on Linux, whatever the default start method (spawned processes, e.g. from
    # torch.multiprocessing.spawn, default to 'spawn'): fork starts in milliseconds instead of
    # re-importing torch, and workers share the TaskCache pages instead of unpickling a copy.
    # Workers never touch CUDA, so forking a CUDA parent is safe.
    ctx = "fork" if nw > 0 and sys.platform.startswith("linux") else None
    loader = DataLoader(ds, batch_size=None, num_workers=nw, persistent_workers=False, generator=gen,
                        multiprocessing_context=ctx, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=2 if nw > 0 else None)
    return wrap_for_device(loader, cfg, train)  # data.decode 'cuda': decoded + augmented on the GPU
