"""What a trainer checkpoint holds, and how a run is put back from one. The functions take the
stateful parts (TrainState, the model, the optimizer side, the checkpoint store), never the Trainer;
checkpoint.py does the atomic writing and the finding.

    trainer.json   TrainState.state_dict() (position, metrics, one RunShape per launch segment) + the
                   loop's other state: model events, class order, global batch, boundary diagnostics,
                   the logs' position (logger.py)
    resume_config.json  the config as given (config_to_dict); a resume must use the same one up to
                   RESUME_MAY_DIFFER (config_fields.py). Not the run folder's config.json (run_record.RUN_CONFIG:
                   the config as run, read by sdlora-export/-report/-diagnose). Checkpoints written
                   before the two had distinct names hold it as config.json: still read.
    model.pt       model.structure() + adapter_state_dict() (gathered whole under ZeRO-3) + a
                   backbone fingerprint
    optimizer.pt   mid-task, without DeepSpeed: the torch optimizer's state (+ scaler.pt with fp16)
    engine/        mid-task, under DeepSpeed: engine.save_checkpoint (sharded per rank)
    rankNNNNN.pt   every rank's RNG states

Task-end checkpoints hold no optimizer state (a fresh optimizer starts every task), so they resume
exactly on any world size and ZeRO stage. A mid-task DeepSpeed checkpoint resumes only on its own
world size and stage; anything else is refused with the newest task-end checkpoint as the fix. The
thread count is state too (it orders float reductions): a resume continues with the recorded one.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .checkpoint import (CheckpointError, Checkpoints, checkpoint_name, rank_file, read_manifest, write_json,
                         write_torch)
from .config_fields import RESUME_MAY_DIFFER
from .distributed import gathered, is_partitioned
from .logger import flatten
from .run_record import fingerprint_matches
from .threads import resume_threads, threads_source
from .train_state import RunShape, TrainState

TRAIN_STATE_KEYS = frozenset(TrainState().state_dict())  # trainer.json's keys that TrainState owns
RESUME_CONFIG = "resume_config.json"  # in a checkpoint: the config a resume is compared against
_RESUME_CONFIG_BEFORE = "config.json"  # its name in checkpoints written before it had its own


def resume_line(path: str, position, global_step: int, cfg) -> str:
    """What a resumed run says about where it stands, numbered as the progress bar and the step
    lines are (tasks from 0, epochs from 1 of E); a finished run says so."""
    task, epoch, step = position
    if task >= cfg.cil.num_tasks:
        return (f"finished run (all {cfg.cil.num_tasks} tasks, global step {global_step}): its results again, from "
                f"{path}")
    if epoch >= cfg.optim.epochs:
        return (f"resumed from {path}: task {task}, after its last epoch (global step {global_step}): its evaluation "
                f"next")
    return (f"resumed from {path}: task {task}, epoch {epoch + 1}/{cfg.optim.epochs}, after {step} of its steps "
            f"(global step {global_step})")


def model_payload(model, fingerprint: list) -> dict:
    """structure + adapter state (whole, on the CPU) + fingerprint. Collective under ZeRO-3: every
    adapter tensor outside the frozen backbone is a trainable parameter of the current task (the
    frozen directions are buffers, never partitioned), so gathering those is enough."""
    with gathered(model.trainable_parameters()):  # structure() reads shapes: placeholders are [0]
        state = {k: v.detach().clone().cpu() for k, v in model.adapter_state_dict().items()}
        structure = model.structure()
    return {"structure": structure, "state": state, "backbone_fingerprint": fingerprint}


def load_model_payload(model, payload: dict, where: str) -> None:
    model.restore_structure(payload["structure"])
    missing, unexpected = model.load_state_dict(payload["state"], strict=False)
    if unexpected or set(missing) != set(model.pretrained_keys):
        extra = sorted(set(missing) - model.pretrained_keys)[:4]
        raise CheckpointError(f"checkpoint {where!r} does not match the model this config builds: missing {extra}, "
                              f"unexpected {sorted(unexpected)[:4]}")


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(s["python"])


class OptimizerState:
    """The optimizer side of a mid-task checkpoint (task-end checkpoints have none: a fresh optimizer
    starts every task). Without DeepSpeed: the torch optimizer's state, complete on every rank (+ the
    fp16 loss scaler). Under DeepSpeed: the engine's, sharded per rank and saved collectively (the
    frozen backbone excluded: it is the pretrained file, and under ZeRO-3 every rank's part of it)."""

    def __init__(self, optimizer, engine=None, scaler=None):
        self.optimizer, self.engine, self.scaler = optimizer, engine, scaler
        self.kind = "deepspeed" if engine is not None else "torch"

    def files(self) -> dict:
        if self.kind == "deepspeed":
            return {}
        files = {"optimizer.pt": write_torch(self.optimizer.state_dict())}
        if self.scaler is not None:
            files["scaler.pt"] = write_torch(self.scaler.state_dict())
        return files

    def collective(self) -> Optional[Callable[[str], None]]:
        if self.kind != "deepspeed":
            return None
        return lambda folder: self.engine.save_checkpoint(folder, tag="engine", save_latest=False,
                                                          exclude_frozen_parameters=True)

    def load(self, path: str) -> None:
        """Into the optimizer/engine just built for the checkpoint's task."""
        if self.kind == "deepspeed":
            load_path, _ = self.engine.load_checkpoint(path, tag="engine", load_module_strict=False,
                                                       load_optimizer_states=True, load_lr_scheduler_states=False)
            if load_path is None:
                raise CheckpointError(f"checkpoint {path!r}: DeepSpeed could not load its engine state from engine/")
            return
        self.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
        if self.scaler is not None and os.path.exists(os.path.join(path, "scaler.pt")):
            self.scaler.load_state_dict(torch.load(os.path.join(path, "scaler.pt"), weights_only=True))


# ---------------------------------------------------------------------- saving
def save_checkpoint(store: Checkpoints, state: TrainState, extra: dict, config: dict, model: dict,
                    optimizer: Optional[OptimizerState], task_end: Optional[int] = None) -> str:
    """Checkpoint the run where `state` stands (every rank calls this). trainer.json = state + `extra`
    (the loop's other JSON-able state); `model` = model_payload(...); task_end=t: right after task t's
    evaluation, no optimizer; None: mid-task, after an optimizer step, with `optimizer`."""
    assert (task_end is None) == (optimizer is not None), "mid-task checkpoints and only they hold the optimizer"
    sd = state.state_dict()
    shared = {"trainer.json": write_json({**sd, **extra}), RESUME_CONFIG: write_json(config),
              "model.pt": write_torch(model)}
    if optimizer is not None:
        shared.update(optimizer.files())
    shape = state.last_shape()
    meta = {"order": checkpoint_order(state.global_step, task_end), "global_step": state.global_step,
            "position": sd["position"], "task_end": task_end, "world_size": shape.world_size,
            "zero_stage": shape.zero_stage, "optimizer_state": "none" if optimizer is None else optimizer.kind,
            "threads": shape.threads, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return store.save(checkpoint_name(state.global_step, task_end), meta, shared, write_torch(rng_state()),
                      None if optimizer is None else optimizer.collective())


def checkpoint_order(global_step: int, task_end: Optional[int]) -> list:
    """The manifest's sort key, oldest to newest: the step, then a task's end after its last step,
    then the task: a method without optimizer steps (NCM) ends every task at global step 0."""
    return [global_step, 0, -1] if task_end is None else [global_step, 1, task_end]


# ---------------------------------------------------------------------- resuming
def check_config(saved: dict, current: dict, where: str) -> None:
    a, b = flatten(saved), flatten(current)
    diff = sorted(k for k in set(a) | set(b) if k not in RESUME_MAY_DIFFER and a.get(k) != b.get(k))
    if diff:
        shown = "; ".join(f"'{k}': checkpoint {a.get(k)!r}, this run {b.get(k)!r}" for k in diff[:4])
        raise CheckpointError(f"checkpoint {where!r} was written by a run with another config ({shown}"
                              f"{'; ...' if len(diff) > 4 else ''}); resume with the original config "
                              f"({os.path.join(where, _resume_config_name(where))}) or start a new run under "
                              f"another name")


def _resume_config_name(path: str, man: Optional[dict] = None) -> str:
    files = (man or read_manifest(path))["files"]
    return RESUME_CONFIG if RESUME_CONFIG in files else _RESUME_CONFIG_BEFORE


def task_end_fallback(store: Checkpoints) -> str:
    """The fix offered when a mid-task checkpoint cannot resume on this launch."""
    ends = [p for p, m in store.scan()[0] if m.get("task_end") is not None]
    return (f"resume from the task-end checkpoint {ends[0]!r} (--resume PATH; exact with any world size)"
            if ends else "start the run again (no task-end checkpoint is left to resume from)")


@dataclass
class Restored:
    """What load_checkpoint hands back beyond the model it filled."""
    state: TrainState  # where the checkpoint stands
    extra: dict  # trainer.json beyond TrainState: events, class order, boundaries, ...
    log_position: dict  # for MetricLogger(resume=...)
    engine_state: Optional[str]  # mid-task: load into the optimizer once built (OptimizerState.load)
    notes: list  # lines to print


def load_checkpoint(path: str, store: Checkpoints, model, fingerprint: list, config: dict, class_order: list,
                    launch: RunShape, rank: int) -> Restored:
    """Check that checkpoint `path` fits this launch (config, class order, precision, backbone,
    engine layout), then put `model` (freshly built) back where it was taken, with this rank's RNG
    states and the recorded thread count; its TrainState is returned. `launch`: this launch's shape."""
    man = read_manifest(path)
    with open(os.path.join(path, "trainer.json")) as f:
        saved = json.load(f)
    with open(os.path.join(path, _resume_config_name(path, man))) as f:
        check_config(json.load(f), config, path)
    if saved["class_order"] != class_order:
        raise CheckpointError(f"checkpoint {path!r} has class order {saved['class_order'][:8]}..., this run "
                              f"{class_order[:8]}...; resume with the original config")
    state = TrainState()
    state.load_state_dict(saved)
    was = state.last_shape()
    if was.mixed_precision != launch.mixed_precision:
        raise CheckpointError(f"checkpoint {path!r} was trained with mixed precision {was.mixed_precision!r}, "
                              f"this launch resolves {launch.mixed_precision!r}; relaunch with the same "
                              f"accelerate config or set dist.mixed_precision={was.mixed_precision!r}")
    payload = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    if not fingerprint_matches(payload["backbone_fingerprint"], fingerprint, model):
        raise CheckpointError(f"config field 'backbone.path': {config['backbone']['path']!r} does not hold the "
                              f"weights checkpoint {path!r} was trained on (fingerprint mismatch); use the original "
                              f"backbone")
    saved_world, kind = man["world_size"], man["optimizer_state"]
    this = f"{launch.world_size} process(es), " + (f"DeepSpeed ZeRO-{launch.zero_stage}" if launch.deepspeed
                                                   else "no DeepSpeed")
    same_engine = launch.deepspeed and launch.zero_stage == man["zero_stage"] and launch.world_size == saved_world
    if kind == "deepspeed" and not same_engine:
        raise CheckpointError(
            f"checkpoint {path!r} was written mid-task by {saved_world} process(es) under DeepSpeed ZeRO-"
            f"{man['zero_stage']}: its optimizer state is sharded per rank and resumes only on the same number of "
            f"processes and ZeRO stage (this launch: {this}). Relaunch that way, or {task_end_fallback(store)}")
    if kind == "torch" and launch.deepspeed:
        raise CheckpointError(
            f"checkpoint {path!r} was written mid-task without DeepSpeed; this launch uses {this}. Relaunch without "
            f"DeepSpeed, or {task_end_fallback(store)}")
    load_model_payload(model, payload, path)
    notes = []
    if state.task < config["cil"]["num_tasks"]:  # a finished run computes nothing more
        threads, line = resume_threads(was.threads, torch.get_num_threads(), threads_source(),
                                       same_world=was.world_size == launch.world_size)
        torch.set_num_threads(threads)
        notes.append(line)
    if saved_world == launch.world_size:
        set_rng_state(torch.load(os.path.join(path, rank_file(rank)), weights_only=True))
    else:
        notes.append(f"note: checkpoint written by {saved_world} process(es), resumed by {launch.world_size}: the "
                     f"same global batches follow; per-rank RNG states are not restored (training draws from none: "
                     f"factors, order and augmentation are seeded explicitly)")
    extra = {k: v for k, v in saved.items() if k not in TRAIN_STATE_KEYS}
    # checkpoints from before event counting hold the metrics.jsonl length only
    log_position = saved.get("log_position") or {"tb_events": None, "jsonl_bytes": saved.get("log_jsonl_bytes", 0)}
    return Restored(state, extra, log_position, path if kind != "none" else None, notes)


def plain_model(model, fingerprint: list, is_main: bool, build_copy: Callable[[], object]):
    """The trained model with every tensor whole, for the final model file. Under ZeRO-3 `model` is
    partitioned: rank 0 rebuilds an ordinary copy (`build_copy()`, outside zero.Init) from the
    adapter state (gathered: collective) instead of gathering the whole backbone; None on the other
    ranks."""
    if not any(is_partitioned(p) for p in model.parameters()):
        return model
    payload = model_payload(model, fingerprint)
    if not is_main:
        return None
    copy = build_copy()
    load_model_payload(copy, payload, "the trained model")
    copy.events = model.events
    return copy
