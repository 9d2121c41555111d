"""Reading task samples out of one WebDataset tar shard, with the bad-data accounting.

`scan_shard` walks a shard's members in tar order (opened seekable: members that are not read are
skipped with a seek, so a worker reads the bytes of its own samples only), groups them by key
like webdataset (key = the name up to the first dot), keeps the samples of the task's classes,
and yields exactly the number of them the index promises: missing ones become placeholders at the
end, more than promised is an error. Unattributable samples (no .cls, a bad class id, a class the
index does not list for the shard), unreadable tars and missing samples go to an `on_bad`
callback, normally a `BadCounter`, which logs them with shard and key and raises `BadDataError`
once their count passes data.bad_sample_tolerance.
"""
from __future__ import annotations

import logging
import re
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

log = logging.getLogger("sdlora_ds.data")

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule: key = up to the first dot
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")


class BadDataError(RuntimeError):
    """Bad samples past data.bad_sample_tolerance; the message (one line) names shards and keys.

    A DataLoader worker's exception reaches the trainer as type(e)("Caught BadDataError in
    DataLoader worker process N.\nOriginal Traceback ...\nsdlora_ds.data.reader.BadDataError: <message>"):
    the message is taken back out of that text, so the error stays one line wherever it was raised."""

    def __init__(self, message: str = ""):
        text = str(message)
        if text.startswith("Caught BadDataError") and "BadDataError: " in text:
            text = text.rpartition("BadDataError: ")[2]
        super().__init__(" ".join(text.split()))


@dataclass
class ShardRef:
    path: str
    count: int      # samples of the task's classes in it (index)
    listed: frozenset  # every class the index lists for this shard
    start: int      # position p of its first task sample in the task stream


@dataclass
class SampleRec:
    """One task sample as read from a shard: data is None when not needed (or bad)."""
    shard: int
    k: int
    key: str
    label: int          # -1 when unknown (a placeholder for a missing/unattributable sample)
    data: Optional[bytes]
    bad: Optional[str]  # reason when the sample is bad


def scan_shard(si: int, sh: ShardRef, keep: frozenset, num_classes: int, want: Callable[[int], bool],
               stop_after: int, on_bad: Callable[..., None]) -> Iterator[SampleRec]:
    """Yield the shard's task samples k = 0.. in tar order, exactly sh.count of them (placeholders
    at the end when samples are missing), reading image bytes only where want(k). Stops after k ==
    stop_after. on_bad(shard, key, reason) is told about every unattributable sample."""
    k = 0
    unattributed = [0]  # samples reported by _sample: each may be one of the task's missing ones

    def report(shard: str, key: str, reason: str) -> None:
        unattributed[0] += 1
        on_bad(shard, key, reason)

    try:
        tf = tarfile.open(sh.path, "r:")  # seekable: members we do not read are skipped
    except (OSError, tarfile.TarError) as e:
        on_bad(sh.path, "<shard>", f"cannot open tar: {e}")
        tf = None
    if tf is not None:
        with tf:
            group: Optional[str] = None
            members: dict = {}
            try:
                for m in _members(tf):
                    if not m.isfile():
                        continue
                    mk = _KEY_RE.match(m.name)
                    if not mk:
                        continue
                    if mk.group(1) != group:
                        if group is not None:
                            rec = _sample(tf, si, sh, k, group, members, keep, num_classes, want, report)
                            if rec is not None:
                                yield rec
                                k += 1
                                # stop early unless the shard's last sample was wanted: then read on
                                # to the end, to catch samples the index does not know about
                                if k > stop_after and stop_after < sh.count - 1:
                                    return
                        group, members = mk.group(1), {}
                    members[mk.group(2).lower()] = m
                if group is not None:
                    rec = _sample(tf, si, sh, k, group, members, keep, num_classes, want, report)
                    if rec is not None:
                        yield rec
                        k += 1
            except (OSError, tarfile.TarError, EOFError) as e:
                on_bad(sh.path, group or "<start>", f"tar unreadable after this key: {e}")
    missing = sh.count - k - unattributed[0]  # not explained by a sample reported above
    if k < stop_after + 1 and missing > 0:
        on_bad(sh.path, "<shard>", f"holds {k} samples of the task's classes, the index says {sh.count}",
               missing)
    for kk in range(k, min(sh.count, stop_after + 1)):
        yield SampleRec(si, kk, f"<missing #{kk}>", -1, None, "missing (see the shard's report above)")


def _members(tf: tarfile.TarFile):
    while True:
        m = tf.next()
        if m is None:
            return
        yield m


def _sample(tf, si, sh, k, key, members, keep, num_classes, want, on_bad) -> Optional[SampleRec]:
    """One grouped tar sample -> a SampleRec if it belongs to the task, None otherwise."""
    cls_m = members.get("cls")
    if cls_m is None:
        on_bad(sh.path, key, "no .cls member (class unknown)")
        return None
    try:
        text = tf.extractfile(cls_m).read().decode("ascii").strip()
        label = int(text)
    except (ValueError, UnicodeDecodeError, OSError, tarfile.TarError) as e:
        on_bad(sh.path, key, f".cls is not an integer: {e}")
        return None
    if not 0 <= label < num_classes:
        on_bad(sh.path, key, f"class id {label} outside 0..{num_classes - 1}")
        return None
    if label not in sh.listed:
        on_bad(sh.path, key, f"class id {label} is not listed for this shard in the index")
        return None
    if label not in keep:
        return None
    if k >= sh.count:
        raise BadDataError(f"shard {sh.path} key {key}: more samples of the task's classes than the index "
                           f"says ({sh.count}); the index is out of date: re-run the converter")
    img_m = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if img_m is None:
        return SampleRec(si, k, key, label, None, f"no image member (has {sorted(members)})")
    if not want(k):
        return SampleRec(si, k, key, label, None, None)
    try:
        data = tf.extractfile(img_m).read()
    except (OSError, tarfile.TarError) as e:
        return SampleRec(si, k, key, label, None, f"image bytes unreadable: {e}")
    if len(data) != img_m.size:
        return SampleRec(si, k, key, label, None, f"image truncated ({len(data)} of {img_m.size} bytes)")
    return SampleRec(si, k, key, label, data, None)


class BadCounter:
    """Counts and logs bad samples; raises once the count passes the tolerance."""

    def __init__(self, tolerance: int):
        self.tolerance = tolerance
        self.count = 0
        self.seen: list[tuple[str, str, str]] = []

    def add(self, shard: str, key: str, reason: str, n: int = 1) -> None:
        self.seen.append((shard, key, reason))
        self.count += n
        if self.count <= self.tolerance:  # past it, the error names it (one line, not two)
            log.warning("bad sample(s) %d: shard %s key %s: %s", self.count, shard, key, reason)
        if self.count > self.tolerance:
            report = "; ".join(f"shard {s} key {k}: {r}" for s, k, r in self.seen[-5:])
            raise BadDataError(f"{self.count} bad sample(s) > data.bad_sample_tolerance={self.tolerance}: "
                               f"{report}. Re-convert or replace the shard, or raise data.bad_sample_tolerance "
                               f"to stand in for such samples")
