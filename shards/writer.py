"""Common shard writing: deterministic WebDataset tars, class-grouped shard plans, the index JSON.

Every converter (digits, ImageNet-R, CIFAR-100, ImageFolder) turns its source into a list of
`SampleSpec`s per split and hands them to `convert()`, which

1. groups them into shards by class (`plan_shards`): a class larger than `max_per_shard` gets
   shards of its own; small classes are packed together. So a task reads only the shards that
   hold its classes, and the index lists the classes of every shard.
2. encodes and writes each shard in a pool of processes with a tqdm bar. A shard is written to a
   temporary name and `os.replace`d, so a file at its final name is always complete.
3. records every finished shard (plan hash + sha256) in a state file next to the shards. A second
   run re-hashes the existing file and skips it when both match; anything else is rewritten.
4. writes index.json (atomically) with class names, per-split/per-class counts, the shard list,
   the split description and who created it.

Tar members are written with fixed metadata (mtime 0, uid/gid 0, no user names) so two runs over
the same input produce byte-identical shards and therefore identical indexes.
Per sample: `{key}.cls` (ASCII decimal class id) first, then `{key}.{ext}` (the image bytes);
stock `tar` and `webdataset` read them (webdataset groups by key, whatever the member order).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from sdlora_ds.fileio import sha256_file  # noqa: F401  (re-exported for the converters)

FORMAT = "sdlora-ds-shards/1"
STATE_FILE = ".shards_state.json"
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class SampleSpec:
    """One sample to convert. `source` is whatever the converter's encode function understands
    (a file path, an array, ...); it must be picklable. `fingerprint` identifies the source content
    cheaply (e.g. path+size+mtime, or a hash of the pixels) and feeds the shard's plan hash."""
    key: str
    cls: int
    source: Any
    fingerprint: str


def sanitize_key(text: str) -> str:
    """A webdataset key may not contain '.' (the first dot starts the extension) or '/'."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0          # fixed metadata: identical input -> identical bytes -> identical sha256
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def tar_bytes(samples: Iterable[tuple[str, int, str, bytes]]) -> bytes:
    """Build a tar in memory from (key, class id, image extension, image bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, cls, ext, data in samples:
            if not _KEY_OK.match(key):
                raise ValueError(f"sample key {key!r} has characters other than [A-Za-z0-9_-]; "
                                 f"pass it through shards.writer.sanitize_key")
            _add_member(tf, f"{key}.cls", str(int(cls)).encode())
            _add_member(tf, f"{key}.{ext}", data)
    return buf.getvalue()


# ----------------------------------------------------------------------------- shard plan
@dataclass
class ShardJob:
    """One shard to write: its path relative to the output folder and its samples (in order)."""
    rel_path: str
    split: str
    samples: list

    def plan_hash(self, options: dict) -> str:
        h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
        for s in self.samples:
            h.update(f"{s.key}\t{s.cls}\t{s.fingerprint}\n".encode())
        return h.hexdigest()


def plan_shards(split: str, samples: Sequence[SampleSpec], max_per_shard: int) -> list[ShardJob]:
    """Group one split's samples into class-grouped shards.

    Classes go in id order. A class with more than `max_per_shard` samples is cut into
    ceil(n / max) nearly equal shards holding only that class; smaller classes are packed into a
    shared shard while the total stays <= max_per_shard. Within a shard: class, then key order.
    """
    if max_per_shard < 1:
        raise ValueError(f"max_per_shard={max_per_shard}: must be >= 1")
    by_cls: dict[int, list[SampleSpec]] = {}
    for s in samples:
        by_cls.setdefault(s.cls, []).append(s)
    groups: list[list[SampleSpec]] = []
    pack: list[SampleSpec] = []
    for c in sorted(by_cls):
        items = sorted(by_cls[c], key=lambda s: s.key)
        if len(items) > max_per_shard:
            if pack:
                groups.append(pack)
                pack = []
            n_sh = -(-len(items) // max_per_shard)
            bounds = [round(i * len(items) / n_sh) for i in range(n_sh + 1)]
            groups.extend(items[bounds[i]:bounds[i + 1]] for i in range(n_sh))
        elif len(pack) + len(items) > max_per_shard:
            groups.append(pack)
            pack = list(items)
        else:
            pack.extend(items)
    if pack:
        groups.append(pack)
    return [ShardJob(f"{split}/{split}-{i:06d}.tar", split, g) for i, g in enumerate(groups)]


# ----------------------------------------------------------------------------- conversion
EncodeFn = Callable[[Any, dict], tuple[str, bytes]]
"""encode(source, options) -> (extension without dot, image bytes). Module-level (picklable)."""


def _write_job(out_dir: str, job: ShardJob, encode: EncodeFn, options: dict, plan: str) -> dict:
    path = os.path.join(out_dir, job.rel_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = []
    for s in job.samples:
        try:
            ext, data = encode(s.source, options)
        except Exception as e:  # name the input: a converter error must say which file broke
            raise ValueError(f"cannot convert sample {s.key!r} from {s.fingerprint}: {e}") from e
        rows.append((s.key, s.cls, ext, data))
    data = tar_bytes(rows)
    atomic_write_bytes(path, data)
    return _entry(job, hashlib.sha256(data).hexdigest(), plan)


def _entry(job: ShardJob, sha: str, plan: str) -> dict:
    per_class: dict[int, int] = {}
    for s in job.samples:
        per_class[s.cls] = per_class.get(s.cls, 0) + 1
    return {"path": job.rel_path, "num_samples": len(job.samples), "classes": sorted(per_class),
            "per_class": {str(c): n for c, n in sorted(per_class.items())}, "sha256": sha, "plan": plan}


def convert(out_dir: str, jobs: Sequence[ShardJob], encode: EncodeFn, options: dict, *,
            workers: int = 1, progress: bool = True, desc: str = "shards") -> tuple[list[dict], dict]:
    """Write every job's shard (skipping verified finished ones). Returns (index entries, stats)."""
    os.makedirs(out_dir, exist_ok=True)
    state_path = os.path.join(out_dir, STATE_FILE)
    state: dict = {}
    if os.path.isfile(state_path):
        try:
            with open(state_path) as f:
                state = json.load(f)
        except (OSError, json.JSONDecodeError):
            state = {}  # a damaged state file only costs a rewrite of every shard
    plans = {j.rel_path: j.plan_hash(options) for j in jobs}
    done: dict[str, dict] = {}
    todo: list[ShardJob] = []
    for j in jobs:
        old = state.get(j.rel_path)
        path = os.path.join(out_dir, j.rel_path)
        if old and old.get("plan") == plans[j.rel_path] and os.path.isfile(path) \
                and sha256_file(path) == old.get("sha256"):
            done[j.rel_path] = old
        else:
            todo.append(j)
    stats = {"written": len(todo), "skipped": len(done)}
    bar = _bar(len(jobs), desc, progress, initial=len(done))

    def finish(entry: dict) -> None:
        done[entry["path"]] = entry
        state[entry["path"]] = entry
        atomic_write_json(state_path, state)  # after each shard: an interrupted run resumes here
        bar.update(1)

    if workers <= 1 or len(todo) <= 1:
        for j in todo:
            finish(_write_job(out_dir, j, encode, options, plans[j.rel_path]))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futs = [pool.submit(_write_job, out_dir, j, encode, options, plans[j.rel_path]) for j in todo]
            for fut in as_completed(futs):
                finish(fut.result())  # a failed shard raises here, naming its input
    bar.close()
    return [done[j.rel_path] for j in jobs], stats


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, progress: bool, initial: int = 0):
    if not progress:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, initial=initial, unit="shard", file=sys.stderr)


# ----------------------------------------------------------------------------- index
def file_list_hash(split_keys: dict[str, Sequence[str]]) -> str:
    """Hash of every split's sorted sample keys: two machines with the same hash made the same split."""
    h = hashlib.sha256()
    for split in sorted(split_keys):
        for k in sorted(split_keys[split]):
            h.update(f"{split}\t{k}\n".encode())
    return h.hexdigest()


def build_index(dataset: str, class_names: Sequence[str], entries_by_split: dict[str, list[dict]],
                split_info: dict, created_by: dict) -> dict:
    n = len(class_names)
    splits = {}
    for split, entries in entries_by_split.items():
        per_class = [0] * n
        for e in entries:
            for c, k in e["per_class"].items():
                per_class[int(c)] += k
        splits[split] = {"num_samples": sum(per_class), "per_class": per_class,
                         "shards": [{k: e[k] for k in ("path", "num_samples", "classes", "per_class", "sha256")}
                                    for e in entries]}
    return {"format": FORMAT, "dataset": dataset, "class_names": list(class_names), "num_classes": n,
            "splits": splits, "split_info": split_info, "created_by": created_by}


def finish_conversion(out_dir: str, dataset: str, class_names: Sequence[str],
                      samples_by_split: dict[str, Sequence[SampleSpec]], encode: EncodeFn, options: dict,
                      split_info: dict, created_by: dict, *, max_per_shard: int, workers: int = 1,
                      progress: bool = True) -> str:
    """Plan, write and index every split; returns the index path. Shared tail of all converters."""
    jobs_by_split = {sp: plan_shards(sp, samples, max_per_shard) for sp, samples in samples_by_split.items()}
    all_jobs = [j for jobs in jobs_by_split.values() for j in jobs]
    entries, _ = convert(out_dir, all_jobs, encode, options, workers=workers, progress=progress,
                         desc=f"{dataset} shards")
    by_path = {e["path"]: e for e in entries}
    entries_by_split = {sp: [by_path[j.rel_path] for j in jobs] for sp, jobs in jobs_by_split.items()}
    info = dict(split_info)
    info["file_list_sha256"] = file_list_hash({sp: [s.key for s in ss] for sp, ss in samples_by_split.items()})
    index = build_index(dataset, class_names, entries_by_split, info, created_by)
    path = os.path.join(out_dir, "index.json")
    atomic_write_json(path, index)
    return path


def stratified_split(labels: Sequence[int], ratios: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Seeded per-class split of positions 0..n-1 into named parts with the given ratios.

    Per class (in class order), the items are permuted with numpy's default_rng(seed + class) and
    cut in the order the ratios are given; every part but the last gets round(ratio * n_class),
    the last the rest. Returns sorted positions per part.
    """
    import numpy as np
    names = list(ratios)
    total = sum(ratios.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split ratios {ratios} sum to {total}, not 1")
    by_cls: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_cls.setdefault(int(c), []).append(i)
    out: dict[str, list[int]] = {n: [] for n in names}
    for c in sorted(by_cls):
        idx = np.asarray(by_cls[c])
        perm = idx[np.random.default_rng([seed, c]).permutation(len(idx))]
        start = 0
        for k, name in enumerate(names):
            cnt = len(idx) - start if k == len(names) - 1 else min(round(ratios[name] * len(idx)), len(idx) - start)
            out[name].extend(int(v) for v in perm[start:start + cnt])
            start += cnt
    return {n: sorted(v) for n, v in out.items()}
