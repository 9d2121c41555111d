"""File helpers shared by the shard converters, the shard index and the checkpoints."""
from __future__ import annotations

import hashlib


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
