"""File helpers shared by the shard converters, the shard index, the checkpoints and the run folder:
the one write-temp-then-rename helper (`atomic_write`, for a file or a folder), hashes of files and
tensors.

A file is replaced by one `os.replace` (atomic on POSIX). A folder cannot be: os.replace does not
replace a non-empty folder, and deleting the old one first leaves nothing if the writer is killed
in between. So a folder is replaced in three steps, each a single rename or removal:

    1. write  `<path>.tmp<pid>`   (the new folder, complete)
    2. rename `<path>` -> `<path>.old<pid>`   (the old one set aside)
    3. rename `<path>.tmp<pid>` -> `<path>`   (the new one in place)
    4. remove `<path>.old<pid>`

A kill after 1 leaves the old folder at `path` (and a temporary); after 2 leaves the old folder
aside, which `recover(path)` (called by every folder write and by the readers of such folders)
renames back; after 3 leaves the new folder at `path` and the aside, which `recover` removes.
Between 2 and 3 a reader in another process, running while the writer is alive, finds no `path`
for the time of one rename: POSIX has no atomic exchange of two folders.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any, Callable, Optional

ASIDE = ".old"  # `<path>.old<pid>`: an old folder set aside by atomic_write (step 2)

_step_hook: Optional[Callable[[int], None]] = None
"""Called with k after step k of a folder replacement (tests set it to kill the process there)."""


def _step(k: int) -> None:
    if _step_hook is not None:
        _step_hook(k)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` (not this one) still runs: the temporaries and asides of a dead one are
    left-overs of a kill. A pid reused by an unrelated process keeps a left-over until it exits."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _asides(path: str) -> list:
    """[(pid, aside path)] of folders set aside from `path` by atomic_write."""
    folder, base = os.path.split(path)
    pattern = re.compile(re.escape(base + ASIDE) + r"(\d+)$")
    out = []
    for name in os.listdir(folder or "."):
        m = pattern.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(folder, name)))
    return out


def recover(path: str) -> None:
    """Undo what a killed folder replacement left: an old folder set aside while `path` is missing
    is renamed back (a kill between steps 2 and 3); an aside next to a `path` that exists is
    removed (a kill between 3 and 4). Asides of a live writer are left to it."""
    path = path.rstrip(os.sep) or path
    if not os.path.isdir(os.path.dirname(path) or "."):
        return
    dead = [a for pid, a in _asides(path) if not pid_alive(pid)]
    if not os.path.lexists(path) and dead:
        # Several asides (kills in repeated writes) cannot all be missing-path left-overs: step 2
        # needs `path` present, so only the newest can be the folder that was there last.
        dead.sort(key=os.path.getmtime)
        try:
            os.rename(dead.pop(), path)
        except FileNotFoundError:  # another reader restored it first
            pass
    if os.path.lexists(path):
        for aside in dead:
            shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(path: str) -> None:
    """Flush a file, or every file of a folder and the folder itself, to disk."""
    if os.path.isdir(path):
        for base, _, names in os.walk(path):
            for n in names:
                fsync_path(os.path.join(base, n))
    fsync_path(path)


def fsync_path(path: str) -> None:
    """Flush one file or folder (its entries: a rename in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None], fsync: bool = False) -> None:
    """Write `path` so that it holds the old content or the new, never a part and never nothing
    (after `recover`, see the module's docstring): `write(tmp)` creates `<path>.tmp<pid>` (a file
    or a folder), which then replaces `path`. fsync: flush the new file (or every file of the new
    folder) to disk before it is renamed in, and the parent folder after, so the rename survives a
    power loss. The pid keeps two writers apart; shards.writer's clean-up finds the temporaries of
    dead processes by it. A failed write removes its temporary and leaves the old content."""
    path = path.rstrip(os.sep) or path
    tmp = f"{path}.tmp{os.getpid()}"
    aside = f"{path}{ASIDE}{os.getpid()}"
    _remove(tmp)
    try:
        write(tmp)
        if fsync:
            _fsync_tree(tmp)
        _step(1)
        if os.path.isdir(tmp):
            recover(path)  # (only folder writes set anything aside)
        if os.path.isdir(tmp) and os.path.isdir(path):
            _remove(aside)
            os.rename(path, aside)
            _step(2)
            os.rename(tmp, path)
            _step(3)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, path)
        if fsync:
            fsync_path(os.path.dirname(path) or ".")
    except BaseException:
        if os.path.isdir(aside) and not os.path.lexists(path):
            os.rename(aside, path)  # the old folder back in place
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def atomic_write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write, fsync=fsync)


def atomic_write_json(path: str, obj: Any, indent: int = 1, newline: bool = False, fsync: bool = False) -> None:
    """json.dump(obj, indent=indent) (plus a final newline if asked), atomically (fsync: see atomic_write)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + ("\n" if newline else "")).encode(), fsync=fsync)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (shards and checkpoints can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tensor_sha256(t) -> str:
    """Hex sha256 of a tensor's raw bytes (dtype and shape prefixed).

    Used to fingerprint the frozen backbone in checkpoints and final models. A float sum is not
    fit for that: torch's CPU reductions change their summation order with the thread count, so a
    run trained with 1 thread and exported or resumed with 2 saw a last-digit difference and was
    refused as "another backbone". Bytes are exact and independent of threads and devices."""
    import torch  # fileio stays importable without torch for the shard converters' pool workers
    x = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    if x.numel():
        h.update(x.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
