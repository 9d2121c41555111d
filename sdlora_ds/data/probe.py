"""Probing the remote shards before training, once per node.

`probe(locations, policy)` opens every non-local shard (with the retries of remote.py), reads its
first tar header and closes it; a failure is one `ShardOpenError` line naming the first failing
location and how many failed, so a wrong URL or credential stops the run at once rather than in a
DataLoader worker mid-epoch.

Why once per node: every process of a launch loads the index (launch/run.py's check, then each
rank's preflight and Trainer), and N ranks x M shards x 2 opens is a burst of requests the store
does not need. The first process of a launch on a node probes; the others wait for it (a file lock)
and read its result from a small file in the node's temp folder. "A launch" is named by a token:
SDLORA_PROBE_TOKEN when set (the prober sets it, so processes it starts - launch/run.py's
`accelerate launch` - inherit it), else the launcher's process (the parent of ranks that have
LOCAL_RANK), else this process; each with its start time, so a recycled process id is a new token.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from sdlora_ds.data.remote import ReadPolicy, RemoteReadFailed, RemoteStream
from sdlora_ds.data.source import ShardOpenError, local_path

TOKEN_ENV = "SDLORA_PROBE_TOKEN"


def _started(pid: int) -> str:
    """The process's start time (clock ticks since boot), '' where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def launch_token() -> str:
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    pid = os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()
    return f"{pid}-{_started(pid)}"


def result_path(token: str, remote: Sequence[str]) -> str:
    """The node-local file holding the probe result of this launch and these locations."""
    key = hashlib.sha256("\n".join([token, *remote]).encode()).hexdigest()[:24]
    return os.path.join(tempfile.gettempdir(), f"sdlora-probe-{os.getuid()}-{key}.json")


def probe_one(location: str, policy: ReadPolicy) -> Optional[str]:
    """None if the location gives a tar's first header, else the error line."""
    stream = RemoteStream(location, policy)
    try:
        head = b""
        while len(head) < 512:
            part = stream.read(512 - len(head))
            if not part:
                break
            head += part
    except RemoteReadFailed as e:
        return str(e)
    finally:
        stream.close()
    if len(head) < 512:
        return f"cannot open shard {location!r}: it holds {len(head)} bytes, not a tar"
    if head[257:262] != b"ustar":
        return f"shard {location!r} is not a tar file (no ustar header in its first 512 bytes)"
    return None


def _probe_all(remote: list[str], policy: ReadPolicy, threads: int) -> Optional[str]:
    # the first alone: a wrong template fails every shard, and a command's own stderr (which
    # gopen passes through) should then say it once, not once per shard
    errors = [e for e in [probe_one(remote[0], policy)] if e]
    if not errors:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(remote) - 1))) as ex:
            errors = [e for e in ex.map(lambda loc: probe_one(loc, policy), remote[1:]) if e]
    if not errors:
        return None
    more = f" ({len(errors) - 1} more of {len(remote)} remote shards failed too)" if len(errors) > 1 else ""
    if len(errors) == 1 and len(remote) > 1 and probe_one(remote[-1], policy):  # first failed: is it all?
        more = " (the last remote shard fails too: check data.shard_url)"
    return errors[0] + more


def probe(locations: Sequence[str], policy: ReadPolicy = ReadPolicy(), threads: int = 8) -> None:
    """ShardOpenError unless every non-local location opens (see the module docstring)."""
    remote = [loc for loc in locations if local_path(loc) is None]
    if not remote:
        return
    token = launch_token()
    with open(result_path(token, remote), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released on close: the others wait here for the first one's result
        f.seek(0)
        try:
            error = json.loads(f.read())["error"]
        except (ValueError, KeyError, TypeError):  # empty (the first here), or left half-written by a killed process
            error = _probe_all(remote, policy, threads)
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"token": token, "shards": len(remote), "error": error}))
            f.flush()
    os.environ[TOKEN_ENV] = token  # processes this one starts (the ranks of a launch) share the result
    if error:
        raise ShardOpenError(error)
