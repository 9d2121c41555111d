"""Reading task samples out of one WebDataset tar shard, with the bad-data accounting.

`scan_shard` opens a shard through webdataset's gopen (source.py) and walks its members in tar
order: a local file seekable (members that are not read are skipped with a seek, so a worker reads
the bytes of its own samples only: measured faster, bench/RESULTS.md), any other stream through
webdataset's tar iteration. It groups members by key like webdataset (key = the name up to the
first dot), keeps the samples of the source's classes,
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

from webdataset.tariterators import tar_file_iterator

from sdlora_ds.data.remote import ReadPolicy, RemoteReadFailed, RemoteStream
from sdlora_ds.data.source import local_path, open_failure, open_shard

log = logging.getLogger("sdlora_ds.data")

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule: key = up to the first dot
SEEK_LOCAL = True  # local files: skip unwanted members by seeking (False: stream them like URLs; bench)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")


class BadDataError(RuntimeError):
    """Bad samples past data.bad_sample_tolerance; the message (one line) names shards and keys.

    A DataLoader worker's exception reaches the trainer as type(e)("Caught BadDataError in
    DataLoader worker process N.\nOriginal Traceback ...\nsdlora_ds.data.reader.BadDataError: <message>"):
    the message is taken back out of that text, so the error stays one line wherever it was raised."""

    def __init__(self, message: str = ""):
        text, name = str(message), type(self).__name__
        if text.startswith(f"Caught {name}") and f"{name}: " in text:
            text = text.rpartition(f"{name}: ")[2]
        super().__init__(" ".join(text.split()))


class ShardReadError(BadDataError):
    """A remote shard that could not be read within data.retries, or whose bytes differ from the
    index's sha256 (remote.py): reported like bad data (one line, exit 2, checkpoints kept), whatever
    data.bad_sample_tolerance."""


@dataclass
class ShardRef:
    """One source of the task stream: a shard, read for `keep` (all the task's classes in it, or
    one class: training reads a shard once per task class it holds, see order.py)."""
    path: str       # location: local path or URL (source.py)
    count: int      # samples of `keep` in it (index)
    listed: frozenset  # every class the index lists for this shard
    start: int      # position p of its first sample in the task stream
    keep: frozenset = frozenset()  # the classes this source yields
    sha256: str = ""  # remote shards: the index's sha256, checked as the bytes stream ('' = not checked)


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
               stop_after: int, on_bad: Callable[..., None], policy: ReadPolicy = ReadPolicy()) -> Iterator[SampleRec]:
    """Yield the shard's task samples k = 0.. in tar order, exactly sh.count of them (placeholders
    at the end when samples are missing), reading image bytes only where want(k). Stops after k ==
    stop_after. on_bad(shard, key, reason) is told about every unattributable sample it passes
    (a shard read for several classes reports such a sample once per class source that passes it:
    counted more than once rather than missed).

    The shard is opened with webdataset's gopen (source.py). A local file is walked with tarfile
    in seekable mode, so members that are not wanted are skipped with a seek; any other stream goes
    through webdataset's tar iteration (`tar_file_iterator`), which reads every byte. A remote shard
    is a RemoteStream (retried and resumed under `policy`, hashed when sh.sha256 is given: then read
    to its end even when the scan stops early); a read that fails for good or a hash mismatch is
    ShardReadError."""
    k = 0
    unattributed = [0]  # samples reported by _sample: each may be one of the task's missing ones

    def report(shard: str, key: str, reason: str) -> None:
        unattributed[0] += 1
        on_bad(shard, key, reason)

    remote = local_path(sh.path) is None
    # local: ShardOpenError (one line) when the opener itself fails; remote: opened at the first read
    stream = RemoteStream(sh.path, policy, sh.sha256) if remote else open_shard(sh.path)
    group: Optional[str] = None
    members: dict = {}
    started = False
    try:
        for name, entry in _iter_members(stream, sh.path):
            started = True
            mk = _KEY_RE.match(name)
            if not mk:
                continue
            if mk.group(1) != group:
                if group is not None:
                    rec = _sample(si, sh, k, group, members, keep, num_classes, want, report)
                    if rec is not None:
                        yield rec
                        k += 1
                        # stop early unless the shard's last sample was wanted: then read on
                        # to the end, to catch samples the index does not know about
                        if k > stop_after and stop_after < sh.count - 1:
                            group = None
                            break
                group, members = mk.group(1), {}
            members[mk.group(2).lower()] = entry
        if group is not None:
            rec = _sample(si, sh, k, group, members, keep, num_classes, want, report)
            if rec is not None:
                yield rec
                k += 1
        if remote:
            stream.finish()  # the rest of the bytes and the sha256 check
    except RemoteReadFailed as e:
        raise ShardReadError(str(e)) from None
    except (OSError, tarfile.TarError, EOFError) as e:
        if not started and remote:  # bytes came, but no tar (e.g. an error page served with 200)
            raise ShardReadError(str(open_failure(sh.path, stream, e))) from None
        on_bad(sh.path, group or "<start>", f"tar unreadable after this key: {e}")
    finally:
        _close(stream)
    missing = sh.count - k - unattributed[0]  # not explained by a sample reported above
    if k < stop_after + 1 and missing > 0:
        on_bad(sh.path, "<shard>", f"holds {k} samples of {_what(keep)}, the index says {sh.count}", missing)
    for kk in range(k, min(sh.count, stop_after + 1)):
        yield SampleRec(si, kk, f"<missing #{kk}>", -1, None, "missing (see the shard's report above)")


def _what(keep: frozenset) -> str:
    return f"class {next(iter(keep))}" if len(keep) == 1 else "the task's classes"


class _Member:
    """A tar member's size and a way to get its bytes (read on demand when seekable)."""
    __slots__ = ("size", "_get")

    def __init__(self, size: int, get: Callable[[], bytes]):
        self.size, self._get = size, get

    def read(self) -> bytes:
        return self._get()


def _iter_members(stream, location: str) -> Iterator[tuple[str, _Member]]:
    """(name, member) for every regular file of the tar, in tar order."""
    if SEEK_LOCAL and local_path(location) is not None and stream.seekable():
        tf = tarfile.open(fileobj=stream, mode="r:")  # seekable: members we do not read are skipped
        while True:
            m = tf.next()
            if m is None:
                return
            tf.members = []  # tarfile keeps every TarInfo otherwise: memory grows with the shard
            if m.isfile():
                yield m.name, _Member(m.size, lambda m=m: tf.extractfile(m).read())
        return
    for d in tar_file_iterator(stream):  # webdataset's tar iteration; it reads each member's bytes
        data = d["data"]
        yield d["fname"], _Member(len(data), lambda data=data: data)


def _close(stream) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - a pipe closed early reports SIGPIPE/curl 23; the data was read
        pass


def _sample(si, sh, k, key, members, keep, num_classes, want, on_bad) -> Optional[SampleRec]:
    """One grouped tar sample -> a SampleRec if it belongs to the task, None otherwise."""
    cls_m = members.get("cls")
    if cls_m is None:
        on_bad(sh.path, key, "no .cls member (class unknown)")
        return None
    try:
        text = cls_m.read().decode("ascii").strip()
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
        data = img_m.read()
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
