"""The checkpoint's stateful parts, each registered once under a name (after torchtitan's checkpoint
manager): CheckpointParts saves them all into one checkpoint folder (checkpoint.Checkpoints writes it
atomically) and loads the ones a resume asks for. Every part is an object with state_dict() and
load_state_dict(sd) (a record has state_dict() only: written for readers and resume.py's checks, never
loaded back); where its state goes is said once, when it is registered:

    JSON      a key of a JSON file written by rank 0 (top_level: the part's keys are the file's own)
    TORCH     a torch file of its own, written by rank 0
    PER_RANK  rankNNNNN.pt, one file per rank (every rank writes its own)
    FOLDER    a folder the part writes itself, every rank together (save_to / load_from: DeepSpeed's
              engine shards its state per rank)

A part registered with `mid_task` (the optimizer side) is only in mid-task checkpoints: a fresh
optimizer starts every task, so task-end checkpoints hold none. The trainer's parts (trainer.py,
_register_parts; docs/resume.md lists them) keep the file names of every earlier checkpoint:
trainer.json, resume_config.json, model.pt, optimizer.pt, scaler.pt, engine/, rankNNNNN.pt. What a
part held in files written before it had its own name or key is read too (old_files, before).

Also here, the parts' state whose saving is more than a state_dict() call: the model's adapters
(model_payload: structure + adapter state, gathered under ZeRO-3) and the RNG streams.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from .checkpoint import (CheckpointError, Checkpoints, checkpoint_name, checkpoint_order, rank_file,
                         read_manifest, write_json, write_torch)
from .distributed import gathered
from .train_state import TrainState

JSON, TORCH, PER_RANK, FOLDER = "json", "torch", "per_rank", "folder"


@dataclass(frozen=True)
class Part:
    """One registered part and where its state is stored."""
    name: str
    obj: Any  # state_dict() [+ load_state_dict(sd)]; FOLDER: save_to(folder) + load_from(checkpoint path)
    where: str  # JSON, TORCH, PER_RANK or FOLDER
    file: Optional[str]  # JSON / TORCH: the file name in the checkpoint; FOLDER: the folder's
    top_level: bool  # JSON: the part's keys are the file's (else it is the file's key `name`)
    mid_task: Optional[str]  # only in mid-task checkpoints: the manifest's optimizer_state then
    old_files: tuple  # earlier names of its file, read when the checkpoint predates `file`
    before: Optional[Callable[[dict], Any]]  # JSON: its state from a file written before it had its key

    @property
    def loadable(self) -> bool:
        return hasattr(self.obj, "load_from" if self.where == FOLDER else "load_state_dict")


class CheckpointParts:
    """The registry. Collective calls (save, and load of a FOLDER part) are made by every rank."""

    def __init__(self):
        self.parts: dict = {}

    def register(self, name: str, obj, where: str, file: Optional[str] = None, top_level: bool = False,
                 mid_task: Optional[str] = None, old_files: tuple = (), before: Optional[Callable] = None) -> None:
        assert name not in self.parts, f"checkpoint part {name!r} registered twice"
        assert where in (JSON, TORCH, PER_RANK, FOLDER), where
        assert (file is None) == (where == PER_RANK), f"part {name!r}: a file name goes with JSON, TORCH and FOLDER"
        assert where == JSON or not (top_level or before), f"part {name!r}: top_level and before are for JSON parts"
        assert mid_task in (None, "torch", "deepspeed"), mid_task
        assert where != PER_RANK or not any(p.where == PER_RANK for p in self.parts.values()), "one per-rank part"
        self.parts[name] = Part(name, obj, where, file, top_level, mid_task, tuple(old_files), before)

    def names(self, mid_task: bool = False) -> list:
        """The loadable parts, in registration order: those of every checkpoint, or (mid_task=True)
        the ones only mid-task checkpoints hold."""
        return [n for n, p in self.parts.items() if p.loadable and bool(p.mid_task) == mid_task]

    # ------------------------------------------------------------------ saving
    def save(self, store: Checkpoints, state: TrainState, task_end: Optional[int] = None) -> str:
        """Checkpoint every part where `state` stands (every rank calls this). task_end=t: right
        after task t's evaluation, without the mid-task parts; None: mid-task, after an optimizer
        step, with them. Every state_dict() is taken before anything is written."""
        parts = [p for p in self.parts.values() if task_end is None or not p.mid_task]
        kinds = {p.mid_task for p in parts if p.mid_task}
        assert (task_end is None) == bool(kinds) and len(kinds) <= 1, "mid-task checkpoints and only they hold " \
                                                                     "the optimizer side, of one kind"
        docs: dict = {}  # JSON file -> its content
        shared, write_rank, collective = {}, None, None
        for p in parts:
            if p.where == FOLDER:
                collective = _folder_saver(p)
                continue
            sd = p.obj.state_dict()
            if p.where == JSON:
                doc = docs.setdefault(p.file, {})
                new = sd if p.top_level else {p.name: sd}
                assert not set(new) & set(doc), f"part {p.name!r} repeats keys of {p.file}"
                doc.update(new)
            elif p.where == TORCH:
                shared[p.file] = write_torch(sd)
            else:
                write_rank = write_torch(sd)
        assert write_rank is not None, "no per-rank part registered"
        shared = {**{f: write_json(doc) for f, doc in docs.items()}, **shared}
        sd, shape = state.state_dict(), state.last_shape()
        meta = {"order": checkpoint_order(state.global_step, task_end), "global_step": state.global_step,
                "position": sd["position"], "task_end": task_end, "world_size": shape.world_size,
                "zero_stage": shape.zero_stage, "optimizer_state": kinds.pop() if kinds else "none",
                "threads": shape.threads, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return store.save(checkpoint_name(state.global_step, task_end), meta, shared, write_rank, collective)

    # ------------------------------------------------------------------ loading
    def read(self, path: str, rank: int) -> "Stored":
        """Checkpoint `path` as written, its parts read on demand (each file once)."""
        return Stored(path, self, rank)

    def load(self, stored: "Stored", names: list) -> None:
        """Put the parts `names` back from `stored`, in registration order (the RNG streams, last
        registered, after anything whose loading may draw from them)."""
        for name in [n for n in self.parts if n in names]:
            p = self.parts[name]
            assert p.loadable, f"part {name!r} is a record: nothing to load"
            try:
                if p.where == FOLDER:
                    p.obj.load_from(stored.path)
                else:
                    p.obj.load_state_dict(stored.state(name))
            except CheckpointError as e:
                raise CheckpointError(f"checkpoint {stored.path!r}: {e}") from None


def _folder_saver(p: Part) -> Callable[[str], None]:
    return lambda folder: p.obj.save_to(folder)


class Stored:
    """One checkpoint's parts as written (CheckpointParts.read)."""

    def __init__(self, path: str, parts: CheckpointParts, rank: int):
        self.path, self.parts, self.rank = path, parts.parts, rank
        self.manifest = read_manifest(path)
        self._files: dict = {}

    def file(self, name: str) -> str:
        """The file part `name` is in, here (an earlier name in a checkpoint that predates it)."""
        p = self.parts[name]
        if p.where == PER_RANK:
            return rank_file(self.rank)
        for f in (p.file, *p.old_files):
            if f in self.manifest["files"]:
                return f
        raise CheckpointError(f"checkpoint {self.path!r} holds no {p.file} (its part {name!r})")

    def state(self, name: str):
        """What part `name` saved (its state_dict() then)."""
        p, f = self.parts[name], self.file(name)
        if f not in self._files:
            if p.where == JSON:
                with open(os.path.join(self.path, f)) as fh:
                    self._files[f] = json.load(fh)
            else:
                self._files[f] = torch.load(os.path.join(self.path, f), map_location="cpu", weights_only=True)
        doc = self._files[f]
        if p.where != JSON or p.top_level:
            return doc
        if p.name in doc:
            return doc[p.name]
        if p.before is not None:
            return p.before(doc)
        raise CheckpointError(f"checkpoint {self.path!r}: {f} has no {p.name!r}")


# ---------------------------------------------------------------------- parts that are a value of their owner
class Record:
    """A value written for the checkpoint's readers and resume.py's checks, never loaded back."""

    def __init__(self, get: Callable[[], Any]):
        self.get = get

    def state_dict(self):
        return self.get()


class Value(Record):
    """A value of its owner, read and put back through two functions (the owner's attribute may be
    replaced, e.g. the model's events list, or the optimizer built anew every task)."""

    def __init__(self, get: Callable[[], Any], put: Callable[[Any], None]):
        super().__init__(get)
        self.put = put

    def load_state_dict(self, sd) -> None:
        self.put(sd)


# ---------------------------------------------------------------------- the model's adapters
def model_payload(model, fingerprint: list) -> dict:
    """structure + adapter state (whole, on the CPU) + fingerprint. Collective under ZeRO-3: every
    adapter tensor outside the frozen backbone is a trainable parameter of the current task (the
    frozen directions are buffers, never partitioned), so gathering those is enough."""
    with gathered(model.trainable_parameters()):  # structure() reads shapes: placeholders are [0]
        state = {k: v.detach().clone().cpu() for k, v in model.adapter_state_dict().items()}
        structure = model.structure()
    return {"structure": structure, "state": state, "backbone_fingerprint": fingerprint}


def load_model_payload(model, payload: dict, where: str) -> None:
    """Into a freshly built model: its structure (the tasks' adapters) grown first, then the state.
    `where` names the payload in the error."""
    model.restore_structure(payload["structure"])
    missing, unexpected = model.load_state_dict(payload["state"], strict=False)
    if unexpected or set(missing) != set(model.pretrained_keys):
        extra = sorted(set(missing) - model.pretrained_keys)[:4]
        raise CheckpointError(f"{where} does not match the model this config builds: missing {extra}, "
                              f"unexpected {sorted(unexpected)[:4]}")


class AdapterState:
    """The model's part: everything but the frozen pretrained backbone (adapters, magnitudes, head),
    with the backbone's fingerprint (checked by resume.py before loading)."""

    def __init__(self, get_model: Callable[[], Any], fingerprint: list):
        self.get_model, self.fingerprint = get_model, fingerprint

    def state_dict(self) -> dict:
        return model_payload(self.get_model(), self.fingerprint)

    def load_state_dict(self, sd: dict) -> None:
        load_model_payload(self.get_model(), sd, "the model's adapter state (model.pt)")


# ---------------------------------------------------------------------- the optimizer side under DeepSpeed
class EngineState:
    """The DeepSpeed engine's state (optimizer shards per rank), written into the checkpoint's
    `engine/` folder by every rank; the frozen backbone is left out (it is the pretrained file, and
    under ZeRO-3 every rank's part of it)."""

    def __init__(self, get_engine: Callable[[], Any]):
        self.get_engine = get_engine

    def save_to(self, folder: str) -> None:
        self.get_engine().save_checkpoint(folder, tag="engine", save_latest=False, exclude_frozen_parameters=True)

    def load_from(self, path: str) -> None:
        """Into the engine just built for the checkpoint's task."""
        load_path, _ = self.get_engine().load_checkpoint(path, tag="engine", load_module_strict=False,
                                                         load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError("DeepSpeed could not load its engine state from engine/")


# ---------------------------------------------------------------------- the RNG streams
class RngStreams:
    """This process's random number generators: torch (CPU and every CUDA device), numpy, python."""

    def state_dict(self) -> dict:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
                "python": random.getstate()}

    def load_state_dict(self, s: dict) -> None:
        torch.set_rng_state(s["torch"])
        if s["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
        name, keys, pos, has_gauss, cached = s["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(s["python"])
