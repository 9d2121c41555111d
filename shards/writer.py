"""Common shard writing: deterministic WebDataset tars, class-grouped shard plans, the index JSON.

Every converter (digits, ImageNet-R, CIFAR-100, ImageFolder) turns its source into a list of
`SampleSpec`s per split and hands them to `convert()`, which

1. groups them into shards by class (`plan_shards`): a class larger than `max_per_shard` gets
   shards of its own; small classes are packed together. So a task reads only the shards that
   hold its classes, and the index lists the classes of every shard.
2. encodes and writes each shard in a pool of processes with a tqdm bar (shards/pool.py: the
   first failure or a Ctrl-C stops every worker at once; workers die with their parent). A
   shard is written to a temporary name (`<name>.tmp<pid>`) and `os.replace`d, so a file at its
   final name is always complete; temporary files left by a killed run (their process is gone)
   are removed by the next run.
3. records every finished shard (plan hash + sha256) in a state file next to the shards, as soon
   as it is finished, also while others are still being written. A second run re-hashes the
   existing file and skips it when both match; anything else is rewritten.
4. writes index.json (atomically) with class names, per-split/per-class counts, the shard list,
   the split description, who created it, and the bad source files left out (`bad_samples`).

A source that cannot be read or decoded stops the conversion with one line naming the file and
the reason (`BadSample`, a ValueError; the CLIs print it as `error: ...`, exit code 2). With
`skip_bad` (the converters' --skip-bad) such samples are left out instead and listed in the index
(`bad_samples.skipped`: split, key, source, reason) and in the summary; a later run without it
rewrites the shards that left something out (and stops on the file, if it is still bad).

Tar members are written with fixed metadata (mtime 0, uid/gid 0, no user names) so two runs over
the same input produce byte-identical shards and therefore identical indexes.
Per sample: `{key}.cls` (ASCII decimal class id) first, then `{key}.{ext}` (the image bytes);
stock `tar` and `webdataset` read them (webdataset groups by key, whatever the member order).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from sdlora_ds import errors, fileio
from sdlora_ds.fileio import sha256_file  # noqa: F401  (re-exported for the converters)

FORMAT = "sdlora-ds-shards/1"
STATE_FILE = ".shards_state.json"
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")
_TMP = re.compile(r"\.tmp(\d+)$")  # atomic_write_bytes' temporary names: <final name>.tmp<pid>
BAD_SOURCE_ERRORS = (ValueError, OSError)
"""What an encode function raises for a bad source (unreadable, corrupt, not an image). Any
other exception is a bug and propagates with its traceback."""


class BadSample(ValueError):
    """One source that cannot be converted: the message names the sample, the file and the reason."""

    def __init__(self, message: str, key: str = "", source: Optional[str] = None, reason: str = ""):
        super().__init__(message)
        self.key, self.source, self.reason = key, source, reason

    def __reduce__(self):  # raised in a pool worker, re-raised in the parent
        return (BadSample, (str(self), self.key, self.source, self.reason))


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
    fileio.atomic_write_bytes(path, data, fsync=True)


def atomic_write_json(path: str, obj: Any) -> None:
    fileio.atomic_write_json(path, obj, indent=1, newline=True, fsync=True)  # as the shards: read by other machines


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


def _source_name(s: SampleSpec) -> Optional[str]:
    return s.source if isinstance(s.source, str) else None


def _write_job(out_dir: str, job: ShardJob, encode: EncodeFn, options: dict, plan: str,
               skip_bad: bool = False) -> dict:
    path = os.path.join(out_dir, job.rel_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows, kept, bad = [], [], []
    for s in job.samples:
        try:
            ext, data = encode(s.source, options)
        except BAD_SOURCE_ERRORS as e:  # name the input: a converter error must say which file broke
            source = _source_name(s)
            if skip_bad:
                bad.append({"split": job.split, "key": s.key, "source": source, "reason": str(e)})
                continue
            where = f" ({source})" if source and source not in str(e) else ""
            raise BadSample(f"sample {s.key}{where}: {e}; remove or replace it and re-run, or re-run with "
                            f"--skip-bad to leave it out (listed in index.json); finished shards are kept",
                            s.key, source, str(e)) from None
        rows.append((s.key, s.cls, ext, data))
        kept.append(s)
    data = tar_bytes(rows)
    atomic_write_bytes(path, data)
    return _entry(job, hashlib.sha256(data).hexdigest(), plan, kept, bad)


def _entry(job: ShardJob, sha: str, plan: str, kept: Optional[list] = None, bad: Sequence[dict] = ()) -> dict:
    per_class: dict[int, int] = {}
    kept = job.samples if kept is None else kept
    for s in kept:
        per_class[s.cls] = per_class.get(s.cls, 0) + 1
    entry = {"path": job.rel_path, "num_samples": len(kept), "classes": sorted(per_class),
             "per_class": {str(c): n for c, n in sorted(per_class.items())}, "sha256": sha, "plan": plan}
    if bad:
        entry["bad"] = list(bad)
    return entry


def remove_stale_temporaries(out_dir: str) -> list[str]:
    """Delete `<name>.tmp<pid>` files under out_dir whose writing process is gone (left by a killed
    run); returns their paths. Files of a live process (another run writing here) are left alone."""
    removed = []
    for folder, _, files in os.walk(out_dir):
        for name in files:
            m = _TMP.search(name)
            if not m:
                continue
            if fileio.pid_alive(int(m.group(1))):
                continue  # another run writing here
            path = os.path.join(folder, name)
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def convert(out_dir: str, jobs: Sequence[ShardJob], encode: EncodeFn, options: dict, *,
            workers: int = 1, progress: bool = True, desc: str = "shards",
            skip_bad: bool = False) -> tuple[list[dict], dict]:
    """Write every job's shard (skipping verified finished ones). Returns (index entries, stats):
    stats = {"written": shards written, "skipped": finished shards verified and kept,
    "bad_samples": sources left out (skip_bad), "stale_removed": temporary files of a killed run
    deleted}. A bad source raises BadSample unless skip_bad."""
    os.makedirs(out_dir, exist_ok=True)
    stale = remove_stale_temporaries(out_dir)
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
        # a shard that left bad sources out is kept only while they may be left out
        if old and old.get("plan") == plans[j.rel_path] and (skip_bad or not old.get("bad")) \
                and os.path.isfile(path) and sha256_file(path) == old.get("sha256"):
            done[j.rel_path] = old
        else:
            todo.append(j)
    stats = {"written": len(todo), "skipped": len(done), "bad_samples": 0, "stale_removed": len(stale)}
    bar = _bar(len(jobs), desc, progress, initial=len(done))

    def finish(entry: dict) -> None:
        done[entry["path"]] = entry
        state[entry["path"]] = entry
        atomic_write_json(state_path, state)  # after each shard: an interrupted run resumes here
        bar.update(1)

    try:
        calls = [(out_dir, j, encode, options, plans[j.rel_path], skip_bad) for j in todo]
        if workers <= 1 or len(todo) <= 1:
            for args in calls:
                finish(_write_job(*args))
        else:
            from shards.pool import run_all
            run_all(_write_job, calls, workers, finish)  # a failed shard raises here, naming its input
    finally:
        bar.close()
    entries = [done[j.rel_path] for j in jobs]
    stats["bad_samples"] = sum(len(e.get("bad", ())) for e in entries)
    return entries, stats


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
                split_info: dict, created_by: dict, bad_samples: Optional[dict] = None) -> dict:
    """The index JSON. bad_samples: {"policy": "stop" | "skip", "skipped": [...]} (finish_conversion)."""
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
    index = {"format": FORMAT, "dataset": dataset, "class_names": list(class_names), "num_classes": n,
             "splits": splits, "split_info": split_info, "created_by": created_by}
    if bad_samples is not None:
        index["bad_samples"] = bad_samples
    return index


def finish_conversion(out_dir: str, dataset: str, class_names: Sequence[str],
                      samples_by_split: dict[str, Sequence[SampleSpec]], encode: EncodeFn, options: dict,
                      split_info: dict, created_by: dict, *, max_per_shard: int, workers: int = 1,
                      progress: bool = True, skip_bad: bool = False) -> str:
    """Plan, write and index every split; returns the index path. Shared tail of all converters.
    skip_bad: leave bad sources out (listed in the index) instead of stopping on the first one.
    With progress, a one-line summary goes to stderr at the end."""
    jobs_by_split = {sp: plan_shards(sp, samples, max_per_shard) for sp, samples in samples_by_split.items()}
    all_jobs = [j for jobs in jobs_by_split.values() for j in jobs]
    entries, stats = convert(out_dir, all_jobs, encode, options, workers=workers, progress=progress,
                             desc=f"{dataset} shards", skip_bad=skip_bad)
    by_path = {e["path"]: e for e in entries}
    entries_by_split = {sp: [by_path[j.rel_path] for j in jobs] for sp, jobs in jobs_by_split.items()}
    info = dict(split_info)
    info["file_list_sha256"] = file_list_hash({sp: [s.key for s in ss] for sp, ss in samples_by_split.items()})
    skipped = [b for e in entries for b in e.get("bad", ())]
    index = build_index(dataset, class_names, entries_by_split, info, created_by,
                        bad_samples={"policy": "skip" if skip_bad else "stop", "skipped": skipped})
    path = os.path.join(out_dir, "index.json")
    atomic_write_json(path, index)
    if progress:
        print(summary_line(dataset, index, stats), file=sys.stderr)
    return path


def summary_line(dataset: str, index: dict, stats: dict) -> str:
    counts = ", ".join(f"{sp} {s['num_samples']:,}" for sp, s in index["splits"].items())
    line = (f"{dataset}: {stats['written'] + stats['skipped']} shards ({stats['written']} written, "
            f"{stats['skipped']} verified and kept), samples: {counts}")
    if stats.get("bad_samples"):
        line += f"; {stats['bad_samples']} bad source file(s) left out (index.json 'bad_samples')"
    if stats.get("stale_removed"):
        line += f"; {stats['stale_removed']} temporary file(s) of an interrupted run removed"
    return line


INTERRUPTED = "interrupted: every shard finished so far is recorded; run the same command again to resume"

run_cli = functools.partial(errors.run_cli, interrupted=INTERRUPTED)
"""run_cli(main, *args) -> exit code: a converter's main(*args) under the one error policy
(sdlora_ds.errors.run_cli: a user mistake or a bad source is one `error: ...` line and exit code 2;
Ctrl-C says what was kept, exit code 130)."""


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
