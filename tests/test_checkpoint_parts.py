"""The registry of a checkpoint's stateful parts, in one process: every kind of storage round-trips,
mid-task parts stay out of task-end checkpoints, records are never loaded, files and keys of older
checkpoints are still read, and the RNG streams come back exactly. (The trainer's own parts, and
bitwise resumption through them, are in test_checkpoint.py.)"""
import json
import os
import random

import numpy as np
import pytest
import torch

from sdlora_ds.checkpoint import CheckpointError, Checkpoints
from sdlora_ds.checkpoint_parts import (FOLDER, JSON, PER_RANK, TORCH, CheckpointParts, Record, RngStreams,
                                        Value)
from sdlora_ds.train_state import RunShape, TrainState


class OneProcess:
    """The accelerator surface Checkpoints uses, for a single process."""
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass


class Box:
    """A stateful object: one tensor and one number."""

    def __init__(self, w: float = 0.0):
        self.w, self.n = torch.full((4,), w), 0

    def state_dict(self):
        return {"w": self.w.clone(), "n": self.n}

    def load_state_dict(self, sd):
        self.w, self.n = sd["w"].clone(), sd["n"]


class Folder:
    """A part that writes its own folder (as DeepSpeed's engine does)."""

    def __init__(self):
        self.text, self.loaded_from = "", None

    def save_to(self, folder):
        os.makedirs(os.path.join(folder, "engine"))
        with open(os.path.join(folder, "engine", "shard0"), "w") as f:
            f.write(self.text)

    def load_from(self, path):
        with open(os.path.join(path, "engine", "shard0")) as f:
            self.text, self.loaded_from = f.read(), path


def state_at(step: int) -> TrainState:
    st = TrainState(position=(0, 0, step), global_step=step)
    st.begin_segment(RunShape(world_size=1, micro_batch=8, grad_accum=1, deepspeed=False, zero_stage=None,
                              mixed_precision="no", threads=1))
    return st


def registry(state, box, events, order, opt, rng, folder=None):
    parts = CheckpointParts()
    parts.register("train_state", state, JSON, "trainer.json", top_level=True)
    parts.register("events", Value(lambda: events["v"], lambda v: events.update(v=v)), JSON, "trainer.json")
    parts.register("class_order", Record(lambda: order), JSON, "trainer.json")
    parts.register("config", Record(lambda: {"lr": 0.1}), JSON, "resume_config.json", top_level=True,
                   old_files=("config.json",))
    parts.register("model", box, TORCH, "model.pt")
    parts.register("optimizer", opt, TORCH, "optimizer.pt", mid_task="torch")
    if folder is not None:
        parts.register("engine", folder, FOLDER, "engine", mid_task="torch")
    parts.register("rng", rng, PER_RANK)
    return parts


def test_every_kind_of_part_round_trips_and_task_ends_leave_the_optimizer_out(tmp_path):
    store = Checkpoints(str(tmp_path / "ck"), keep=10, accelerator=OneProcess())
    events, box, opt, folder = {"v": [{"merge": 1}]}, Box(3.0), Box(5.0), Folder()
    folder.text = "shard"
    box.n = 7
    parts = registry(state_at(2), box, events, [4, 2, 0], opt, RngStreams(), folder)
    mid = parts.save(store, parts.parts["train_state"].obj, task_end=None)
    end = parts.save(store, state_at(3), task_end=0)
    with open(os.path.join(mid, "trainer.json")) as f:
        doc = json.load(f)
    assert list(doc)[:2] == ["position", "global_step"] and list(doc)[-2:] == ["events", "class_order"]
    assert doc["class_order"] == [4, 2, 0] and doc["events"] == [{"merge": 1}]
    files = sorted(os.listdir(mid))
    assert files == ["engine", "manifest.json", "model.pt", "optimizer.pt", "rank00000.pt", "resume_config.json",
                     "trainer.json"], files
    assert "optimizer.pt" not in os.listdir(end) and "engine" not in os.listdir(end)
    with open(os.path.join(mid, "manifest.json")) as f:
        man = json.load(f)
    assert (man["optimizer_state"], man["task_end"], man["global_step"]) == ("torch", None, 2)
    with open(os.path.join(end, "manifest.json")) as f:
        assert json.load(f)["optimizer_state"] == "none"

    # a fresh set of objects, put back from the mid-task checkpoint
    events2, box2, opt2, folder2, state2 = {"v": []}, Box(), Box(), Folder(), TrainState()
    fresh = registry(state2, box2, events2, [9], opt2, RngStreams(), folder2)
    stored = fresh.read(mid, rank=0)
    assert fresh.names() == ["train_state", "events", "model", "rng"]  # records are never loaded
    assert fresh.names(mid_task=True) == ["optimizer", "engine"]
    assert stored.state("class_order") == [4, 2, 0] and stored.state("config") == {"lr": 0.1}
    fresh.load(stored, fresh.names())
    assert state2.position == (0, 0, 2) and events2["v"] == [{"merge": 1}]
    assert torch.equal(box2.w, box.w) and box2.n == 7 and opt2.n == 0 and folder2.loaded_from is None
    fresh.load(stored, fresh.names(mid_task=True))
    assert torch.equal(opt2.w, opt.w) and folder2.text == "shard" and folder2.loaded_from == mid
    with pytest.raises(CheckpointError, match="holds no optimizer.pt"):  # a task end has no optimizer side
        fresh.load(fresh.read(end, rank=0), ["optimizer"])


def test_files_and_keys_of_older_checkpoints_are_still_read(tmp_path):
    """A part's earlier file name (old_files) and its state in files written before it had its own
    key (before) are read; a key missing without a rule for it is an error naming the file."""
    store = Checkpoints(str(tmp_path / "ck"), keep=10, accelerator=OneProcess())
    parts = registry(state_at(1), Box(), {"v": []}, [0], Box(), RngStreams())
    path = parts.save(store, state_at(1), task_end=None)
    os.rename(os.path.join(path, "resume_config.json"), os.path.join(path, "config.json"))
    with open(os.path.join(path, "trainer.json")) as f:
        doc = json.load(f)
    doc.pop("events")
    doc["log_jsonl_bytes"] = 123
    with open(os.path.join(path, "trainer.json"), "w") as f:
        json.dump(doc, f)
    man_path = os.path.join(path, "manifest.json")
    with open(man_path) as f:
        man = json.load(f)
    man["files"]["config.json"] = man["files"].pop("resume_config.json")
    man["files"]["trainer.json"]["bytes"] = os.path.getsize(os.path.join(path, "trainer.json"))
    with open(man_path, "w") as f:
        json.dump(man, f)

    older = CheckpointParts()
    older.register("config", Record(lambda: {}), JSON, "resume_config.json", top_level=True,
                   old_files=("config.json",))
    got = {}
    older.register("log_position", Value(lambda: {}, lambda v: got.update(v)), JSON, "trainer.json",
                   before=lambda d: {"tb_events": None, "jsonl_bytes": d.get("log_jsonl_bytes", 0)})
    older.register("events", Value(lambda: [], lambda v: None), JSON, "trainer.json")
    stored = older.read(path, rank=0)
    assert stored.file("config") == "config.json" and stored.state("config") == {"lr": 0.1}
    older.load(stored, ["log_position"])
    assert got == {"tb_events": None, "jsonl_bytes": 123}
    with pytest.raises(CheckpointError, match=r"trainer\.json has no 'events'"):
        older.load(stored, ["events"])


def test_a_part_that_does_not_fit_is_named_with_the_checkpoint(tmp_path):
    store = Checkpoints(str(tmp_path / "ck"), keep=10, accelerator=OneProcess())
    parts = registry(state_at(1), Box(), {"v": []}, [0], Box(), RngStreams())
    path = parts.save(store, state_at(1), task_end=None)

    class Refuses(Box):
        def load_state_dict(self, sd):
            raise CheckpointError("the model's adapter state (model.pt) does not match")
    other = registry(TrainState(), Refuses(), {"v": []}, [0], Box(), RngStreams())
    with pytest.raises(CheckpointError, match=rf"checkpoint '{path}': the model's adapter state"):
        other.load(other.read(path, rank=0), ["model"])


def test_registration_mistakes_are_caught():
    parts = CheckpointParts()
    parts.register("rng", RngStreams(), PER_RANK)
    with pytest.raises(AssertionError, match="twice"):
        parts.register("rng", RngStreams(), PER_RANK)
    with pytest.raises(AssertionError, match="one per-rank part"):
        parts.register("rng2", RngStreams(), PER_RANK)
    with pytest.raises(AssertionError, match="file name"):
        parts.register("model", Box(), TORCH)
    with pytest.raises(AssertionError, match="mid-task checkpoints and only they"):
        parts.save(Checkpoints("unused", 1, OneProcess()), state_at(1), task_end=None)  # no optimizer side


def test_rng_streams_come_back_exactly(tmp_path):
    rng = RngStreams()
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.save(rng.state_dict(), tmp_path / "r.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    rng.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
