"""sdlora_ds.data.order: the training order against a full permutation, on the paper shapes.

Simulated from the loader's own plan (order.epoch_order on sample positions; nothing decoded):
classes per batch of 128 and the largest class's share of a batch, averaged over every batch of
several epochs, for CIFAR-100 B10 (10 classes x 500 train images, one shard per class, as
shards.cifar100 writes them) and ImageNet-R B40 (40 classes of uneven size, ~120 train images each,
packed as shards.imagefolder does: <= 256 samples per shard, so most shards hold 2-3 classes).
Tolerance: 2% of the full permutation's value (the interleave matches it in distribution; the
averages differ by sampling noise, well under 1%). The previous order (shards one after another
through a 2,000-sample buffer) is checked to FAIL the same tolerance, so the test can tell.
"""
import numpy as np
import pytest

from sdlora_ds.data.order import buffer_order, epoch_order, interleave, labels_in_order

B, BUF, EPOCHS = 128, 2000, 12


def _pack(sizes, max_per_shard):
    """shards.writer.plan_shards' packing: classes in id order, small ones share a shard."""
    shards, cur = [], []
    for c, n in enumerate(sizes):
        if cur and sum(m for _, m in cur) + n > max_per_shard:
            shards.append(cur)
            cur = []
        cur.append((c, n))
    shards.append(cur)
    return shards


def _sources(shards):
    """The loader's training sources: one per (shard, class)."""
    return [c for sh in shards for c, _ in sh], [n for sh in shards for _, n in sh]


def _stats(label_seqs):
    per_batch, top = [], []
    for labels in label_seqs:
        for s in range(0, len(labels) - B + 1, B):  # full batches only
            _, counts = np.unique(labels[s:s + B], return_counts=True)
            per_batch.append(len(counts))
            top.append(counts.max() / B)
    return float(np.mean(per_batch)), float(np.mean(top))


def _old_order(shards, seed, epoch):
    """The previous loader: shard order shuffled, samples in tar order, then the buffer."""
    order = np.random.default_rng([seed, epoch, 0x5D]).permutation(len(shards))
    items = [c for si in order for c, n in shards[si] for _ in range(n)]
    out = buffer_order(len(items), BUF, np.random.default_rng([seed, epoch, 2]))
    return np.asarray(items)[out]


CIFAR_B10 = [[(c, 500)] for c in range(10)]
_sizes = np.random.default_rng(0).integers(50, 191, size=40)  # mean ~120, uneven like ImageNet-R's
IMR_B40 = _pack(list(_sizes), 256)


@pytest.mark.parametrize("name,shards,expect", [("cifar_b10", CIFAR_B10, (10.0, 0.14)),
                                                ("imr_b40", IMR_B40, (36.0, 0.065))])
def test_classes_per_batch_and_largest_share_match_a_full_permutation(name, shards, expect):
    classes, counts = _sources(shards)
    ours = _stats([labels_in_order(classes, counts, seed=s, epoch=e, buf=BUF) for s in (1, 2) for e in range(EPOCHS)])
    all_labels = np.repeat(classes, counts)
    full = _stats([np.random.default_rng([9, s, e]).permutation(all_labels) for s in (1, 2) for e in range(EPOCHS)])
    old = _stats([_old_order(shards, s, e) for s in (1, 2) for e in range(EPOCHS)])
    print(f"{name}: classes/batch ours {ours[0]:.2f} full {full[0]:.2f} old {old[0]:.2f}; "
          f"largest share ours {ours[1]:.3f} full {full[1]:.3f} old {old[1]:.3f}")
    assert abs(ours[0] - full[0]) <= 0.02 * full[0] and abs(ours[1] - full[1]) <= 0.02 * full[1]
    assert abs(old[0] - full[0]) > 0.02 * full[0] or abs(old[1] - full[1]) > 0.02 * full[1]  # the test can fail
    assert abs(full[0] - expect[0]) < 0.1 * expect[0] and abs(full[1] - expect[1]) < 0.15 * expect[1]  # shape sanity


def test_no_drift_toward_recent_shards():
    """The class mix is the same at the start and the end of an epoch (the previous order leaned
    toward the shards opened most recently): each class's share of the first and the last 20% of
    the epoch, averaged over epochs, is its share of the task within 2 percentage points."""
    classes, counts = _sources(CIFAR_B10)
    first, last = np.zeros(10), np.zeros(10)
    for e in range(EPOCHS):
        labels = labels_in_order(classes, counts, seed=3, epoch=e, buf=BUF)
        cut = len(labels) // 5
        first += np.bincount(labels[:cut], minlength=10) / cut
        last += np.bincount(labels[-cut:], minlength=10) / cut
    assert np.abs(first / EPOCHS - 0.1).max() < 0.02 and np.abs(last / EPOCHS - 0.1).max() < 0.02


def test_interleave_is_exact_and_seeded():
    counts = [5, 0, 3, 7]
    src, k = interleave(counts, np.random.default_rng(0))
    assert len(src) == 15 and np.bincount(src, minlength=4).tolist() == counts
    for s, n in enumerate(counts):  # each source read front to back, every sample once
        assert k[src == s].tolist() == list(range(n))
    a = epoch_order([500] * 10, 7, 3, BUF)
    b = epoch_order([500] * 10, 7, 3, BUF)
    c = epoch_order([500] * 10, 7, 4, BUF)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # identical on resume
    assert not np.array_equal(a[2], c[2])                    # another epoch, another order
    out = a[2]
    assert sorted(out.tolist()) == list(range(5000))        # a permutation of the inputs
    assert (out <= np.arange(5000) + BUF).all()             # the memory bound: <= one buffer behind


def test_within_class_positions_mix():
    """What the buffer buys, stated as a number: Spearman correlation between a sample's place in
    its shard and its output position (a full permutation: ~0; the interleave alone: ~1)."""
    counts = [500] * 10
    src, k, out = epoch_order(counts, 5, 0, BUF)
    pos = np.empty(5000)
    pos[out] = np.arange(5000)
    rho = np.corrcoef(np.argsort(np.argsort(k)), np.argsort(np.argsort(pos)))[0, 1]
    print(f"within-class rank correlation (CIFAR B10, buffer {BUF}): {rho:.2f}")
    assert rho < 0.9  # less than the interleave alone; not ~0 (see order.py: what remains)
