"""File helpers shared by the shard converters, the shard index, the checkpoints and the run folder:
the one write-temp-then-rename helper (`atomic_write`), hashes of files and tensors."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], None], fsync: bool = False) -> None:
    """Write `path` so that it holds the old content or the new, never a part: `write(tmp)` creates
    `<path>.tmp<pid>` (a file or a folder), which then replaces `path` (a folder at `path` is
    removed first: os.replace does not replace a non-empty folder). fsync: flush a file to disk
    before the rename. The pid keeps two writers apart; shards.writer's clean-up finds the
    temporaries of dead processes by it. A failed write removes its temporary."""
    path = path.rstrip(os.sep) or path
    tmp = f"{path}.tmp{os.getpid()}"
    _remove(tmp)
    try:
        write(tmp)
        if fsync and os.path.isfile(tmp):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if os.path.isdir(tmp) and os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def atomic_write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write, fsync=fsync)


def atomic_write_json(path: str, obj: Any, indent: int = 1, newline: bool = False) -> None:
    """json.dump(obj, indent=indent) (plus a final newline if asked), atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + ("\n" if newline else "")).encode())


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
