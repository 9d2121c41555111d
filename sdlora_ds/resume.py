"""What a resume may change, and what it may not. The checkpoint's parts are saved and loaded by
their registry (checkpoint_parts.py; the trainer registers them); this module reads what a checkpoint
says about the run that wrote it and decides, before anything is loaded, whether this launch may
continue it, and which parts come back:

    config        resume_config.json, the config as given: the same up to RESUME_MAY_DIFFER
                  (config_fields.py). Not the run folder's config.json (run_record.RUN_CONFIG: the
                  config as run, read by sdlora-export/-report/-diagnose). Checkpoints written before
                  the two had distinct names hold it as config.json: still read.
    class order   the same
    precision     the same mixed precision as the segment that wrote the checkpoint
    backbone      the same weights (run_record.fingerprint_matches on model.pt's fingerprint)
    engine        task-end checkpoints hold no optimizer state (a fresh optimizer starts every task),
                  so they resume exactly on any world size and ZeRO stage. A mid-task DeepSpeed
                  checkpoint resumes only on its own world size and stage; a mid-task checkpoint
                  without DeepSpeed only without it; anything else is refused with the newest
                  task-end checkpoint as the fix. Its optimizer side is loaded once the task's
                  optimizer is built (Restored.pending).
    RNG streams   restored on the same world size only (per rank)
    threads       state too (they order float reductions): a resume continues with the recorded count
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .checkpoint import CheckpointError, Checkpoints
from .checkpoint_parts import CheckpointParts, Stored
from .config_fields import RESUME_MAY_DIFFER
from .logger import flatten
from .run_record import fingerprint_matches
from .threads import resume_threads, threads_source
from .train_state import RunShape, TrainState

RESUME_CONFIG = "resume_config.json"  # in a checkpoint: the config a resume is compared against
RESUME_CONFIG_BEFORE = "config.json"  # its name in checkpoints written before it had its own


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


# ---------------------------------------------------------------------- resuming
def check_config(saved: dict, current: dict, path: str, file: str) -> None:
    """`saved`: the config in checkpoint `path`'s `file`, named in the fix."""
    a, b = flatten(saved), flatten(current)
    diff = sorted(k for k in set(a) | set(b) if k not in RESUME_MAY_DIFFER and a.get(k) != b.get(k))
    if diff:
        shown = "; ".join(f"'{k}': checkpoint {a.get(k)!r}, this run {b.get(k)!r}" for k in diff[:4])
        raise CheckpointError(f"checkpoint {path!r} was written by a run with another config "
                              f"({shown}{'; ...' if len(diff) > 4 else ''}); resume with the original config "
                              f"({os.path.join(path, file)}) or start a new run under another name")


def task_end_fallback(store: Checkpoints) -> str:
    """The fix offered when a mid-task checkpoint cannot resume on this launch."""
    ends = [p for p, m in store.scan()[0] if m.get("task_end") is not None]
    return (f"resume from the task-end checkpoint {ends[0]!r} (--resume PATH; exact with any world size)"
            if ends else "start the run again (no task-end checkpoint is left to resume from)")


@dataclass
class Restored:
    """What load_checkpoint hands back beyond the parts it put back."""
    pending: Optional[Stored]  # mid-task: the optimizer side, to load once built (parts.names(mid_task=True))
    notes: list  # lines to print


def load_checkpoint(path: str, parts: CheckpointParts, store: Checkpoints, fingerprint: list, model, config: dict,
                    class_order: list, launch: RunShape, rank: int) -> Restored:
    """Check that checkpoint `path` fits this launch (config, class order, precision, backbone,
    engine layout), then put the registered parts back where it was taken (this rank's RNG streams
    only on the same world size) and continue with the recorded thread count. `fingerprint`: this
    launch's backbone_fingerprint(model); `launch`: this launch's shape."""
    stored = parts.read(path, rank)
    man = stored.manifest
    check_config(stored.state("config"), config, path, stored.file("config"))
    saved_order = stored.state("class_order")
    if saved_order != class_order:
        raise CheckpointError(f"checkpoint {path!r} has class order {saved_order[:8]}..., this run "
                              f"{class_order[:8]}...; resume with the original config")
    saved = TrainState()
    saved.load_state_dict(stored.state("train_state"))
    was = saved.last_shape()
    if was.mixed_precision != launch.mixed_precision:
        raise CheckpointError(f"checkpoint {path!r} was trained with mixed precision {was.mixed_precision!r}, "
                              f"this launch resolves {launch.mixed_precision!r}; relaunch with the same "
                              f"accelerate config or set dist.mixed_precision={was.mixed_precision!r}")
    if not fingerprint_matches(stored.state("model")["backbone_fingerprint"], fingerprint, model):
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
    notes, names = [], parts.names()
    if saved_world != launch.world_size:
        names.remove("rng")
        notes.append(f"note: checkpoint written by {saved_world} process(es), resumed by {launch.world_size}: the "
                     f"same global batches follow; per-rank RNG states are not restored (training draws from none: "
                     f"factors, order and augmentation are seeded explicitly)")
    parts.load(stored, names)
    if saved.task < config["cil"]["num_tasks"]:  # a finished run computes nothing more
        threads, line = resume_threads(was.threads, torch.get_num_threads(), threads_source(),
                                       same_world=was.world_size == launch.world_size)
        torch.set_num_threads(threads)
        notes.insert(0, line)
    # a fresh view for the optimizer side: what was read here (model.pt's payload) is not held until then
    return Restored(parts.read(path, rank) if kind != "none" else None, notes)
