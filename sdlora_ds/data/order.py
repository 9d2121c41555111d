"""The training order of one task and epoch: a random interleave of class streams, then a buffer.

Why: the references draw a full random permutation of the task's samples every epoch
(DataLoader(shuffle=True)). Shards here are grouped by class, and a stream can only be read front
to back, so a full permutation would need the whole task in memory or random access. Reading the
class shards one after another through a shuffle buffer (the previous order) left batches
dominated by the shards opened last (CIFAR-100 B10, batch 128: 8.5 of 10 classes per batch, the
largest class 22% of it; a full permutation: 10 classes, 14%).

The order here, computed on positions only (no byte read, identical in every worker and rank):

1. Sources: one per (shard, task class in it), its samples in tar order (reader.scan_shard with
   keep = {class}); a shard holding several task classes is read once per class.
2. Interleave: the sequence of sources is a uniformly random arrangement of the multiset
   {source s repeated count_s times} (`interleave`), i.e. at every step the next sample comes from
   a source with probability proportional to what it has left. Since every source holds one
   class, the class-label sequence has exactly the distribution of a full permutation's: classes
   per batch and class shares per batch match it, for any batch size, by construction.
3. Buffer: that sequence passes through a shuffle buffer of data.shuffle_buffer samples
   (`buffer_order`), which mixes the samples of one class across positions (a full permutation
   also puts sample 0 of a class after sample 100 of it half the time; the interleave alone never
   does). What remains unlike a full permutation: within a class, a sample's position still
   correlates with its place in the tar when the task is much larger than the buffer.

Memory bound, per DataLoader worker: one open stream (file, HTTP connection or pipe process) per
source of the task, plus at most data.shuffle_buffer + batch_size encoded samples held between
reading and batching (a worker reads its samples in interleave order up to the last input of its
current batch, which is at most one buffer past that batch's output positions, so what it holds
for later batches came out of the buffer's at most shuffle_buffer slots), plus the plan itself:
arrays of the task's sample count.

Seeded by (seed, epoch) only: the same on every rank, with any worker count, and on resume.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def interleave(counts: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(src, k), int32 arrays of length sum(counts): the i-th sample of the interleaved stream is
    sample k[i] (in reading order) of source src[i]. Uniform over all interleavings."""
    counts = np.asarray(counts, dtype=np.int64)
    src = rng.permutation(np.repeat(np.arange(len(counts), dtype=np.int32), counts))
    order = np.argsort(src, kind="stable")  # positions of source 0's samples, then source 1's, ...
    starts = np.cumsum(counts) - counts
    k = np.empty(len(src), dtype=np.int32)
    k[order] = np.arange(len(src)) - np.repeat(starts, counts)
    return src.astype(np.int32), k


def buffer_order(n: int, buf: int, rng: np.random.Generator) -> np.ndarray:
    """Output order (input positions) of a shuffle buffer of size `buf` over n items: fill the
    buffer, then emit a random slot and refill it with the next input; drain shuffled. Computed on
    positions only, so every worker knows which sample comes out where before reading any.
    An output at position q always comes from an input at position <= q + buf."""
    if n <= buf:
        return rng.permutation(n)
    slots = list(range(buf))
    picks = rng.integers(0, buf, size=n - buf)
    out = np.empty(n, dtype=np.int64)
    for q, (i, j) in enumerate(zip(range(buf, n), picks)):
        out[q] = slots[j]
        slots[j] = i
    out[n - buf:] = np.asarray(slots)[rng.permutation(buf)]
    return out


def epoch_order(counts: Sequence[int], seed: int, epoch: int, buf: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, k, out_to_in): the interleaved input stream and the buffer's output order for one
    epoch; output position q holds sample k[out_to_in[q]] of source src[out_to_in[q]]."""
    src, k = interleave(counts, np.random.default_rng([seed, epoch, 0x5D]))
    return src, k, buffer_order(len(src), buf, np.random.default_rng([seed, epoch, 2]))


def labels_in_order(source_classes: Sequence[int], counts: Sequence[int], seed: int, epoch: int,
                    buf: int) -> np.ndarray:
    """Class of every output position (what a batch of the epoch holds), from the plan alone: for
    statistics of the order without reading a shard."""
    src, _, out_to_in = epoch_order(counts, seed, epoch, buf)
    return np.asarray(source_classes)[src[out_to_in]]
