"""Checkpoints: atomic folders with a manifest, discovery of the newest complete one, keep-last-K.
What goes in is the registered stateful parts' (checkpoint_parts.py); this module writes and finds
folders, and resume.py decides whether one fits a launch.

    run_dir/checkpoints/
      step-00000120/             mid-task, after optimizer step 120
      step-00000150-task1-end/   end of task 1 (after its evaluation; no optimizer state)
        manifest.json            written last: name, order, position, world size, engine, and every
                                 other file with its size and sha256
        trainer.json, resume_config.json, model.pt, [optimizer.pt, scaler.pt | engine/], rankNNNNN.pt
      .tmp-step-00000180/        being written, or left by a killed run: never picked up

Every rank writes into `.tmp-<name>/`; after a barrier rank 0 writes the manifest, fsyncs and
renames the folder (atomic on POSIX), so a kill at any moment leaves the old checkpoints or a new
complete one. Complete = no leading dot, a parsable manifest, every listed file present at its size
(sha256 checked before loading). output_dir must be on a filesystem every node shares.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Optional

from .fileio import fsync_path, sha256_file

FORMAT = "sdlora-ds-checkpoint/1"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (a user-facing error: names the folder and the fix)."""


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def checkpoint_name(global_step: int, task_end: Optional[int] = None) -> str:
    return f"step-{global_step:08d}" + ("" if task_end is None else f"-task{task_end}-end")


def checkpoint_order(global_step: int, task_end: Optional[int]) -> list:
    """The manifest's sort key, oldest to newest: the step, then a task's end after its last step,
    then the task: a method without optimizer steps (NCM) ends every task at global step 0."""
    return [global_step, 0, -1] if task_end is None else [global_step, 1, task_end]


def _files(folder: str) -> list:
    out = []
    for base, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(base, n), folder) for n in names]
    return sorted(out)


def read_manifest(path: str, verify_hashes: bool = False) -> dict:
    """The manifest of a complete checkpoint folder; CheckpointError saying why it is not one."""
    name = os.path.basename(os.path.normpath(path))
    if name.startswith("."):
        raise CheckpointError(f"checkpoint {path!r} is a temporary folder (being written, or left by a killed run)")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"checkpoint {path!r} has no {MANIFEST} (not a checkpoint, or never completed)")
    try:
        with open(mpath) as f:
            man = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path!r}: unreadable {MANIFEST}: {e}") from None
    fmt = man.get("format") if isinstance(man, dict) else None
    if fmt != FORMAT or not isinstance(man.get("files"), dict) or not isinstance(man.get("order"), list):
        raise CheckpointError(f"checkpoint {path!r} has format {fmt!r} (or no file list), expected {FORMAT!r}")
    for rel, info in man["files"].items():
        fp = os.path.join(path, rel)
        if not os.path.isfile(fp):
            raise CheckpointError(f"checkpoint {path!r}: {rel} is missing")
        if os.path.getsize(fp) != info["bytes"]:
            raise CheckpointError(f"checkpoint {path!r}: {rel} has {os.path.getsize(fp)} bytes, the manifest "
                                  f"says {info['bytes']} (half-written or damaged)")
        if verify_hashes and sha256_file(fp) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path!r}: {rel} does not match its sha256 (damaged)")
    return man


class Checkpoints:
    """The checkpoint folder of one run. Collective methods (save) are called by every rank."""

    def __init__(self, root: str, keep: int, accelerator):
        self.root, self.keep, self.acc = root, keep, accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process

    # ------------------------------------------------------------------ finding
    def scan(self) -> tuple[list, list]:
        """(complete: [(path, manifest)] newest first, skipped: [reason]) by sizes, without hashing."""
        complete, skipped = [], []
        if not os.path.isdir(self.root):
            return complete, skipped
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            if not os.path.isdir(path):
                continue
            if name.startswith(".damaged-"):  # set aside by a fresh start (--fresh-if-damaged)
                continue
            if name.startswith("."):
                skipped.append(f"{name}: temporary folder (being written, or left by a killed run)")
                continue
            try:
                complete.append((path, read_manifest(path)))
            except CheckpointError as e:
                skipped.append(str(e))
        complete.sort(key=lambda pm: tuple(pm[1]["order"]), reverse=True)
        return complete, skipped

    def newest(self) -> tuple[Optional[str], list]:
        """(newest checkpoint whose files all match their sha256, or None; reasons others were skipped)."""
        complete, skipped = self.scan()
        for path, _ in complete:
            try:
                read_manifest(path, verify_hashes=True)
                return path, skipped
            except CheckpointError as e:
                skipped.append(str(e))
        return None, skipped

    def resolve(self, resume: Optional[str], fresh_if_damaged: bool = False) -> tuple[Optional[str], list]:
        """The checkpoint to start from, decided on rank 0 alone (the others get its answer):
        resume=None: none (refused if this run folder already holds checkpoints: they would mix);
        'auto': the newest complete one whose files match their sha256, or none; a path: that
        checkpoint (or the newest complete one of a checkpoints folder). If every checkpoint is
        damaged, 'auto' stops (naming each and why) rather than silently start over; with
        fresh_if_damaged they are set aside as `.damaged-<name>` and the run starts from the
        beginning. Returns (path or None, notes to print); raises CheckpointError on every rank alike."""
        from .distributed import broadcast_object
        answer = None
        if self.is_main:
            try:
                answer = ("ok", *self._resolve(resume, fresh_if_damaged))
            except CheckpointError as e:
                answer = ("error", str(e), [])
        answer = broadcast_object(self.acc, answer)
        if answer[0] == "error":
            raise CheckpointError(answer[1])
        return answer[1], answer[2]

    def _resolve(self, resume: Optional[str], fresh_if_damaged: bool = False) -> tuple[Optional[str], list]:
        if resume is None:
            complete, _ = self.scan()
            if complete:
                raise CheckpointError(
                    f"run folder {os.path.dirname(self.root)!r} already holds checkpoints (newest "
                    f"{os.path.basename(complete[0][0])}); pass --resume auto to continue that run, or give this run "
                    f"another name (config field 'name') or delete the folder to start over")
            return None, []
        if resume == "auto":
            path, skipped = self.newest()
            notes = [f"skipped {s}" for s in skipped]
            if path is None:
                damaged = self._damaged()
                if damaged and not fresh_if_damaged:
                    raise CheckpointError(
                        f"--resume auto: every checkpoint in {self.root!r} is damaged, nothing to resume from "
                        f"({'; '.join(skipped)}); resume from another copy with --resume PATH, or pass "
                        f"--resume auto --fresh-if-damaged to start this run over (its logs restart too)")
                for name in damaged:
                    os.rename(os.path.join(self.root, name), os.path.join(self.root, f".damaged-{name}"))
                    notes.append(f"set aside damaged checkpoint {name} as .damaged-{name}")
                notes.append(f"no complete checkpoint in {self.root!r}: starting from the beginning")
            return path, notes
        path = os.path.abspath(resume)
        is_collection = (os.path.isdir(path) and not os.path.isfile(os.path.join(path, MANIFEST))
                         and not os.path.basename(path).startswith(".")
                         and any(os.path.isdir(os.path.join(path, n)) for n in os.listdir(path)))
        if is_collection:  # a checkpoints folder: its newest complete checkpoint
            found, skipped = Checkpoints(path, self.keep, self.acc).newest()
            if found is None:
                raise CheckpointError(f"--resume {resume!r}: no complete checkpoint in that folder "
                                      f"({'; '.join(skipped) or 'it is empty'})")
            return found, [f"skipped {s}" for s in skipped]
        if not os.path.isdir(path):
            raise CheckpointError(f"--resume {resume!r}: no such checkpoint folder; use --resume auto or the path of "
                                  f"a folder under run_dir/checkpoints/")
        read_manifest(path, verify_hashes=True)
        return path, []

    def _damaged(self) -> list:
        """Names of checkpoint folders that are not temporary (so they were sealed once) but fail
        their manifest, size or sha256 check (call after newest() found none usable)."""
        if not os.path.isdir(self.root):
            return []
        return sorted(n for n in os.listdir(self.root)
                      if os.path.isdir(os.path.join(self.root, n)) and not n.startswith("."))

    # ------------------------------------------------------------------ writing
    def save(self, name: str, meta: dict, shared: dict, write_rank: Callable[[str], None],
             collective: Optional[Callable[[str], None]] = None) -> str:
        """Write checkpoint `name` atomically (every rank calls this).

        shared: {file name: writer(path)} run on rank 0; write_rank(path): this rank's own file;
        collective(folder): run by every rank first (DeepSpeed's engine.save_checkpoint);
        meta: manifest fields (must hold 'order', a list sorting checkpoints oldest to newest)."""
        tmp, final = os.path.join(self.root, f".tmp-{name}"), os.path.join(self.root, name)
        if self.is_main:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        self.acc.wait_for_everyone()
        if collective is not None:
            collective(tmp)
        write_rank(os.path.join(tmp, rank_file(self.rank)))
        if self.is_main:
            for fname, writer in shared.items():
                writer(os.path.join(tmp, fname))
        self.acc.wait_for_everyone()  # every rank's files are in place
        if self.is_main:
            self._seal(tmp, final, name, meta)
        return final

    def _seal(self, tmp: str, final: str, name: str, meta: dict) -> None:
        files = _files(tmp)
        missing = [rank_file(r) for r in range(self.world) if rank_file(r) not in files]
        if missing:
            raise CheckpointError(
                f"checkpoint {final!r}: {missing[:4]} were not written where rank 0 can see them: every node must "
                f"see output_dir on a shared filesystem (config field 'output_dir')")
        info = {}
        for rel in files:
            fp = os.path.join(tmp, rel)
            fsync_path(fp)
            info[rel] = {"bytes": os.path.getsize(fp), "sha256": sha256_file(fp)}
        man = {"format": FORMAT, "name": name, **meta, "files": info}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(man, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # the same step saved again after a resume: replace it
            old = os.path.join(self.root, f".del-{name}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(self.root)
        shutil.rmtree(os.path.join(self.root, f".del-{name}"), ignore_errors=True)
        self.prune()

    def prune(self) -> None:
        """Delete complete checkpoints beyond the newest `keep` (rank 0), never the newest task-end
        one: it is the only kind that resumes on another world size or ZeRO stage (mid-task DeepSpeed
        checkpoints hold per-rank optimizer shards). Renamed to `.del-<name>` first, then deleted."""
        complete, _ = self.scan()
        task_ends = [p for p, m in complete if m.get("task_end") is not None]
        for path, _ in complete[self.keep:]:
            if task_ends and path == task_ends[0]:
                continue
            trash = os.path.join(self.root, ".del-" + os.path.basename(path))
            os.rename(path, trash)  # gone from discovery at once, even if the deletion is interrupted
            shutil.rmtree(trash, ignore_errors=True)

    def sweep(self) -> None:
        """Remove what a killed run left behind (temporary and half-deleted folders; rank 0)."""
        if self.is_main and os.path.isdir(self.root):
            for name in os.listdir(self.root):
                if name.startswith((".tmp-", ".del-")):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def write_json(obj) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
    return write


def write_torch(obj) -> Callable[[str], None]:
    def write(path: str) -> None:
        import torch
        torch.save(obj, path)
    return write
