"""Reading a remote shard (or index) as one byte stream that survives a broken connection.

`RemoteStream(location, policy, sha256)` is the file object the reader walks for every location
that is not a local file (source.py). A read that fails for a reason that may pass (connection
refused or reset, no data for data.read_timeout seconds, HTTP 5xx/408/429, a body shorter than the
server announced, a non-zero exit of a `pipe:` command or of webdataset's other openers) is retried
after data.retry_wait x 2^i seconds (i = 0, 1, ...; at most 60 s, plus up to 25% jitter so that many
ranks do not come back at the same instant), at most data.retries times, and continues at the byte
where the failed read stopped:

- http(s) (read here with urllib, not webdataset's curl, to see the status and send Range): the
  retry asks for `Range: bytes=N-`; a 206 continues there, a 200 (a server that ignores Range,
  e.g. Python's http.server) is read and its first N bytes dropped.
- every other opener (pipe:, sftp, ...): the command is run again and its first N bytes dropped.

So the reader above sees the same bytes as an unbroken read: the same samples in the same order,
the same floats. Permanent answers (HTTP 4xx such as 404/403, an opener webdataset lacks) are not
retried. Each retry is logged once (rank, location, byte offset, reason) and counted (`retry_count`,
shared by a rank's DataLoader workers; the trainer writes the sum over ranks to results.json).

With `sha256` (the index's, when data.verify_checksums), the bytes are hashed as they are delivered
(a resumed read continues the same hash; dropped bytes are not hashed twice) and `finish()` reads
to the end and compares. After the last retry or on a hash mismatch: `RemoteReadFailed`, one line
naming the location and what was tried (reader.py turns it into bad data: exit 2, checkpoints kept).
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import random
import select
import signal
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException, IncompleteRead
from typing import Optional

from sdlora_ds.data.source import check_scheme, exit_reason, scheme, wds_gopen

log = logging.getLogger("sdlora_ds.data")

MAX_WAIT = 60.0  # seconds: the backoff stops doubling here
CHUNK = 1 << 16


@dataclass(frozen=True)
class ReadPolicy:
    """How remote reads are retried (data.retries, data.retry_wait, data.read_timeout)."""
    retries: int = 5
    retry_wait: float = 1.0
    timeout: float = 60.0
    rank: int = 0  # named in the retry log line

    @classmethod
    def from_config(cls, cfg, rank: int = 0) -> "ReadPolicy":
        return cls(cfg.retries, cfg.retry_wait, cfg.read_timeout, rank)

    def wait(self, attempt: int, rng: random.Random) -> float:
        """Seconds before retry `attempt` (1-based)."""
        return min(self.retry_wait * 2 ** (attempt - 1), MAX_WAIT) * (1 + 0.25 * rng.random())


class RemoteReadFailed(Exception):
    """A remote read that failed for good (after the retries, a permanent answer, a hash mismatch)."""


class _Transient(Exception):
    """One attempt failed in a way a retry may mend."""


def _shared_counter():
    try:  # shared memory made in the rank's main process: forked DataLoader workers add to the same count
        return multiprocessing.get_context("fork").Value("q", 0)
    except (ValueError, OSError):  # no fork here (then workers are not forked either): this process only
        return multiprocessing.Value("q", 0)


_RETRIES = _shared_counter()


def retry_count() -> int:
    """Retries of remote reads in this process and its DataLoader workers so far."""
    return int(_RETRIES.value)


# ------------------------------------------------------------------ one attempt
class _Http:
    """One GET (from byte `offset`), its body read in chunks; a 200 to a Range request skips."""

    def __init__(self, url: str, offset: int, timeout: float):
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            self.resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            why = f"HTTP {e.code} {e.reason} (the server answered with an HTTP error)"
            if e.code >= 500 or e.code in (408, 429):
                raise _Transient(why) from None
            raise RemoteReadFailed(why) from None
        except urllib.error.URLError as e:
            raise _Transient(_net_reason(e.reason)) from None
        except (OSError, HTTPException) as e:
            raise _Transient(_net_reason(e)) from None
        self.skip = offset
        length = self.resp.headers.get("Content-Length")
        self.left = int(length) if length and length.isdigit() else None  # None: the server did not say
        if offset and self.resp.status == 206:
            start = self.resp.headers.get("Content-Range", "").partition(" ")[2].partition("-")[0]
            if start != str(offset):
                self.close()
                raise _Transient(f"asked for bytes from {offset}, got Content-Range "
                                 f"{self.resp.headers.get('Content-Range')!r}")
            self.skip = 0

    def read(self, n: int) -> bytes:
        try:
            data = self.resp.read1(n)  # what has arrived: a stalled read keeps the bytes before the stall
        except IncompleteRead as e:
            raise _Transient(f"the body ended early ({len(e.partial)} bytes of the last part, "
                             f"{e.expected} announced bytes missing): the connection broke") from None
        except (OSError, HTTPException) as e:
            raise _Transient(_net_reason(e)) from None
        if self.left is not None:
            if not data and self.left:  # http.client returns b"" (no IncompleteRead) for a body cut short
                raise _Transient(f"the body ended {self.left} bytes short of its Content-Length: the connection "
                                 f"broke")
            self.left -= len(data)
        return data

    def close(self) -> None:
        try:
            self.resp.close()
        except Exception:  # noqa: BLE001 - a broken connection may fail to close: nothing left to read
            pass


class _Opened:
    """Any other opener of webdataset (a subprocess for pipe:, sftp, ...), read without blocking for
    longer than the timeout; the command's exit status is checked at the end of its output."""

    def __init__(self, location: str, offset: int, timeout: float):
        self.timeout, self.skip = timeout, offset  # the command starts at byte 0: drop what was delivered
        try:
            self.stream = wds_gopen.gopen(location, "rb")
        except Exception as e:  # noqa: BLE001 - gopen raises OSError, ValueError, ...
            raise RemoteReadFailed(f"{type(e).__name__}: {e}") from None
        self.pipe = self.stream if isinstance(self.stream, wds_gopen.Pipe) else None

    def read(self, n: int) -> bytes:
        if self.pipe is None:
            try:
                return self.stream.read(n)
            except OSError as e:
                raise _Transient(f"{type(e).__name__}: {e}") from None
        fd = self.pipe.stream.fileno()  # raw fd: the buffered reader could block for a full n bytes
        if not select.select([fd], [], [], self.timeout)[0]:
            raise _Transient(f"no data for {self.timeout:g} s (data.read_timeout)")
        data = os.read(fd, n)
        if not data:
            status = self.pipe.proc.wait()
            if status != 0:
                raise _Transient(exit_reason(self.pipe, status))
        return data

    def close(self) -> None:
        if self.pipe is None:
            try:
                self.stream.close()
            except Exception:  # noqa: BLE001
                pass
            return
        # not Pipe.close: it waits for the command (up to 2 h for a stalled one) and raises on SIGPIPE
        self.pipe.stream.close()
        proc = self.pipe.proc
        if proc.poll() is None:  # stalled or no longer wanted: the shell and what it started
            for pid in [*_descendants(proc.pid), proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.pipe.status = proc.wait()


def _descendants(pid: int) -> list[int]:
    """Processes started by `pid` and theirs (Linux /proc; [] elsewhere): a pipe: command runs in a
    shell, and killing the shell alone would leave a stalled command running."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except (OSError, ValueError):
        return []
    return [d for k in kids for d in (*_descendants(k), k)]


def _net_reason(e) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "could not connect to the server (connection refused)"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "no data within data.read_timeout (timed out)"
    if isinstance(e, socket.gaierror):
        return f"could not resolve the host ({e})"
    return f"the connection broke ({type(e).__name__}: {e})"


# ------------------------------------------------------------------ the stream
class RemoteStream:
    """A forward-only binary stream of `location` that retries and resumes (module docstring)."""

    def __init__(self, location: str, policy: ReadPolicy, sha256: str = "", what: str = "shard"):
        check_scheme(location, what)
        self.location, self.policy, self.expected, self.what = location, policy, sha256, what
        self.pos = 0  # bytes received from the source (and hashed): where a retry continues
        self._buf, self._off = b"", 0  # the chunk being delivered, and how much of it was
        self.hash = hashlib.sha256() if sha256 else None
        self.tries: list[str] = []  # "at byte N: reason" of every failed attempt
        self.retried = 0
        self._src = None
        self._eof = False
        self._rng = random.Random()  # jitter only; never the global generators (sample order uses those)
        self._t0 = time.monotonic()
        self.closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def _open(self):
        url = wds_gopen.rewrite_url(self.location)  # GOPEN_REWRITE, as webdataset's gopen applies it
        if scheme(url) in ("http", "https"):
            src = _Http(url, self.pos, self.policy.timeout)
        else:  # gopen rewrites the location itself
            src = _Opened(self.location, self.pos, self.policy.timeout)
        while src.skip:  # a reopened stream (or a server ignoring Range) starts at byte 0: drop what we have
            data = src.read(min(src.skip, CHUNK))
            if not data:
                src.close()
                raise _Transient(f"the new read ended at byte {self.pos - src.skip}, before byte {self.pos}")
            src.skip -= len(data)
        return src

    def _attempt(self) -> bytes:
        if self._src is None:
            self._src = self._open()
        return self._src.read(CHUNK)

    def _fill(self) -> bytes:
        """The next chunk from the source (b"" at its end), retried and hashed."""
        while True:
            try:
                data = self._attempt()
                break
            except _Transient as e:
                self._retry(str(e))
            except RemoteReadFailed as e:
                raise RemoteReadFailed(self._final(str(e))) from None
        if not data:
            self._eof = True
            self._close_src()
            return b""
        self.pos += len(data)
        if self.hash is not None:
            self.hash.update(data)
        return data

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while True:
                part = self.read(CHUNK)
                if not part:
                    return b"".join(parts)
                parts.append(part)
        if n == 0:
            return b""
        # chunks of CHUNK bytes from the source, whatever the caller asks for (tarfile: 10 KiB):
        # fewer calls into the socket and the hash (measured: bench/data_throughput.py)
        if self._off >= len(self._buf):
            if self._eof:
                return b""
            self._buf, self._off = self._fill(), 0
        if self._off == 0 and n >= len(self._buf):
            out = self._buf
        else:
            out = self._buf[self._off:self._off + n]
        self._off += len(out)
        return out

    def _retry(self, reason: str) -> None:
        self._close_src()
        self.tries.append(f"at byte {self.pos}: {reason}")
        if self.retried >= self.policy.retries:
            raise RemoteReadFailed(self._final(reason)) from None
        self.retried += 1
        with _RETRIES.get_lock():
            _RETRIES.value += 1
        wait = self.policy.wait(self.retried, self._rng)
        log.warning("data read retry %d of %d: rank %d, %s at byte %d: %s; trying again in %.1f s",
                    self.retried, self.policy.retries, self.policy.rank, self.location, self.pos, reason, wait)
        time.sleep(wait)

    def _final(self, reason: str) -> str:
        if len(self.tries) > 1:
            tried = (f"{len(self.tries)} tries in {time.monotonic() - self._t0:.0f} s (data.retries="
                     f"{self.policy.retries}, data.retry_wait={self.policy.retry_wait:g}), each retry from the byte "
                     f"reached; first {self.tries[0]}, last {self.tries[-1]}")
        elif self.tries:
            tried = f"{self.tries[0]} (after {self.retried} retries)"
        else:
            tried = f"at byte {self.pos}: {reason} (not retried: a permanent answer)"
        if scheme(self.location) == "pipe":
            test = f"`{self.location[5:]} | head -c 1k` works"
        else:
            test = f"`curl -fsSL {self.location} | head -c 1k` works"
        return (f"cannot read {self.what} {self.location!r}: {tried}; check that {test} (raise data.retries / "
                f"data.retry_wait to wait longer for a store that comes back)")

    def finish(self) -> None:
        """Read to the end (what the reader left, e.g. the tar's end padding) and compare the sha256
        of all the bytes with the index's; RemoteReadFailed on a mismatch. No-op without a sha256."""
        if self.hash is None:
            return
        while self.read(CHUNK):
            pass
        got = self.hash.hexdigest()
        if got != self.expected:
            raise RemoteReadFailed(f"{self.what} {self.location!r} has sha256 {got[:16]}... ({self.pos} bytes), "
                                   f"the index says {self.expected[:16]}...: the bytes served are damaged or from "
                                   f"another conversion; re-upload the shard or re-run the converter")

    def _close_src(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None

    def close(self) -> None:
        self._close_src()
        self.closed = True


def fetch(location: str, policy: ReadPolicy, what: str) -> bytes:
    """The whole content of a remote location (e.g. an index.json URL), with the same retries."""
    stream = RemoteStream(location, policy, what=what)
    try:
        return stream.read()
    finally:
        stream.close()
