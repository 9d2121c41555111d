"""What a trainer checkpoint holds, and how a run is put back from one (sdlora_ds/checkpoint.py does
the atomic writing and the finding).

    trainer.json   Trainer.state_dict(): position (task, epoch, step in epoch), global step, accuracy
                   matrix, losses, task times, model events, class order, batch plan, precision, the
                   launch topology of every segment so far, the logs' position (logger.py)
    config.json    the resolved config; a resume must use the same one up to RESUME_MAY_DIFFER
    model.pt       model.structure() + adapter_state_dict() (frozen and current directions,
                   magnitudes, classifier; gathered whole under ZeRO-3) + a backbone fingerprint
    optimizer.pt   mid-task, without DeepSpeed: the torch optimizer's state (momentum), complete
    scaler.pt      mid-task, without DeepSpeed, fp16 only: the loss scaler
    engine/        mid-task, under DeepSpeed: engine.save_checkpoint (fp32 master weights and
                   optimizer state, partitioned per rank; the frozen backbone excluded)
    rankNNNNN.pt   every rank's RNG states (torch, CUDA, numpy, python)

The intra-op thread count is part of the state too (it changes the order of float reductions): it is
recorded in trainer.json (per launch segment) and manifest.json, and a resume continues with it
(`resume_threads`).

At a task end the optimizer is discarded anyway (a fresh one per task), so task-end checkpoints hold
no optimizer state: the model state is complete, and resuming from one is exact with ANY number of
processes and any ZeRO stage. Mid-task: without DeepSpeed the optimizer state is complete too (DDP
keeps it whole on every rank) and the world size may change (the data order depends on the global
batch only, data/loader.py; sums over ranks then group differently: float-rounding differences, as
between 1 and N processes). Under DeepSpeed the engine's state is sharded per rank, so a mid-task
checkpoint is resumed only with the same world size and ZeRO stage; otherwise the run is refused with
a message naming the newest task-end checkpoint, which does allow the change.
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Optional

import numpy as np
import torch

from .checkpoint import CheckpointError, checkpoint_name, rank_file, read_manifest, write_json, write_torch
from .config import config_to_dict
from .distributed import gathered, is_partitioned, plain_construction
from .fileio import atomic_write_json, tensor_sha256
from .logger import flatten

# Config fields a resumed run may change: where things are and how often to log or save; nothing
# that changes what is computed. (backbone.path may move: the weights' fingerprint must still match.)
RESUME_MAY_DIFFER = {"name", "output_dir", "backbone.path", "backbone.weights_name", "data.index", "data.num_workers",
                     "data.cache_task", "data.verify_checksums", "data.bad_sample_tolerance", "train.log_every",
                     "train.eval_batch", "train.checkpoint_every", "train.keep_checkpoints", "dist.timeout_s",
                     "dist.mixed_precision"}  # the RESOLVED precision must match (checked separately)


# ---------------------------------------------------------------------- what a run records about itself
def backbone_record(model, cfg) -> dict:
    """The backbone the run really uses, read from the loaded model (not the config's arch fields,
    which a pretrained backbone ignores): model/backbone.py's describe_backbone, plus the MLP width,
    the LayerNorm epsilon and where the weights came from."""
    from .model.backbone import describe_backbone
    bb, c = model.backbone, model.backbone.config
    rec = describe_backbone(bb)
    mlp = getattr(c, "intermediate_size", None) or int(round(getattr(c, "mlp_ratio", 0) * c.hidden_size))
    rec.update(mlp_size=int(mlp), layer_norm_eps=float(c.layer_norm_eps), source=cfg.backbone.source,
               path=cfg.backbone.path, weights_name=cfg.backbone.weights_name)
    return rec


def config_record(cfg, backbone: dict) -> dict:
    """The resolved config as run: the backbone section's architecture fields hold the loaded
    model's values (for source='pretrained' the configured ones are unused defaults). Loading it
    again builds the same run (launch/export.py does)."""
    d = config_to_dict(cfg)
    b = d["backbone"]
    for key in ("hidden_size", "num_layers", "num_heads", "mlp_size", "patch_size", "image_size", "layer_norm_eps"):
        b[key] = backbone[key]
    b["arch"] = backbone["arch"]
    b["num_register_tokens"] = backbone.get("num_register_tokens", 0)  # 0: an architecture without registers
    return d


def topology(trainer) -> dict:
    """How this launch runs the loop (one entry per segment of a resumed run, in results.json and
    every checkpoint's trainer.json), with the intra-op thread count of its processes."""
    return {"from_global_step": trainer.global_step, "from_position": list(trainer.position),
            "world_size": trainer.world, "micro_batch": trainer.micro, "grad_accum": trainer.accum,
            "deepspeed": trainer.deepspeed, "zero_stage": trainer.stage,
            "mixed_precision": str(trainer.acc.mixed_precision), "threads": torch.get_num_threads()}


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


# ---------------------------------------------------------------------- the thread count
THREADS_SOURCE_ENV = "SDLORA_THREADS_SOURCE"
"""'auto' when launch/run.py chose OMP_NUM_THREADS itself (launch/runtime.py), 'user' when it was given."""


def threads_source(environ=None) -> str:
    """Who chose this process's thread count: 'user' (OMP_NUM_THREADS set by hand, or by plain
    `accelerate launch`, which cannot be told apart) or 'auto' (launch/run.py or launch/train.py
    from the CPU and process counts; also a Trainer built in-process without OMP_NUM_THREADS)."""
    env = os.environ if environ is None else environ
    if env.get(THREADS_SOURCE_ENV) in ("auto", "user"):
        return env[THREADS_SOURCE_ENV]
    return "user" if env.get("OMP_NUM_THREADS", "").strip() else "auto"


def resume_threads(recorded: Optional[int], current: int, source: str, same_world: bool = True) -> tuple:
    """(threads to continue with, the one line that says so). The thread count changes the order of
    float reductions, so a resume continues with the count the checkpoint was trained with, unless
    the user forced another one (then it says the run will not be bitwise), or the world size
    changed (the sums over ranks group differently anyway: this launch's own share of the CPUs)."""
    if recorded is not None and recorded != current and not same_world:
        return current, (f"threads: {current} per process (the checkpoint was trained with {recorded}, on another "
                         f"number of processes: not bitwise anyway)")
    if recorded is None:
        return current, (f"threads: {current} per process (the checkpoint records no thread count: it was written "
                         f"before counts were recorded; floats may differ from an uninterrupted run in the last "
                         f"digits)")
    if recorded == current:
        return current, f"threads: {current} per process, as recorded in the checkpoint"
    if source == "auto":
        return recorded, (f"threads: {recorded} per process, as recorded in the checkpoint (this launch would have "
                          f"used {current}), so the run continues bitwise")
    return current, (f"warning: OMP_NUM_THREADS={current} forces {current} thread(s) per process, the checkpoint was "
                     f"trained with {recorded}: the resumed run will not be bitwise identical to an uninterrupted "
                     f"one (unset OMP_NUM_THREADS, or set it to {recorded}, to continue bitwise)")


def _per_pretrained_tensor(model, fn) -> list:
    """[fn(tensor) for every pretrained tensor, by name]. Under ZeRO-3 the backbone may be
    partitioned from construction on (transformers builds it inside zero.Init): each tensor is
    gathered in turn (collective; one tensor at a time, never the whole backbone)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    out = []
    for k in sorted(model.pretrained_keys):
        with gathered([tensors[k]]):
            out.append(fn(tensors[k]))
    return out


def backbone_fingerprint(model) -> list:
    """sha256 of every pretrained tensor's bytes (fileio.tensor_sha256)."""
    return _per_pretrained_tensor(model, tensor_sha256)


def fingerprint_matches(saved: list, current: list, model) -> bool:
    """Does a saved fingerprint describe `model`'s backbone? `current` = backbone_fingerprint(model).
    Files written before the sha256 fingerprints hold float64 sums, whose last digits depend on the
    thread count: those are compared to a relative 1e-9 (a changed backbone moves them far more)."""
    if saved and isinstance(saved[0], float):
        sums = _per_pretrained_tensor(model, lambda t: float(t.detach().cpu().double().sum()))
        return len(sums) == len(saved) and all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(sums, saved))
    return saved == current


def model_payload(trainer) -> dict:
    """structure + adapter state (whole, on the CPU) + fingerprint. Collective under ZeRO-3: every
    adapter tensor outside the frozen backbone is a trainable parameter of the current task (the
    frozen directions are buffers, never partitioned), so gathering those is enough."""
    model = trainer.model
    with gathered(model.trainable_parameters()):  # structure() reads shapes: placeholders are [0]
        state = {k: v.detach().clone().cpu() for k, v in model.adapter_state_dict().items()}
        structure = model.structure()
    return {"structure": structure, "state": state, "backbone_fingerprint": trainer.fingerprint}


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


def write_json_atomic(path: str, obj) -> None:
    atomic_write_json(path, obj, indent=1)


# ---------------------------------------------------------------------- saving
def save_checkpoint(trainer, task_end: Optional[int] = None) -> str:
    """Checkpoint the run where it stands (every rank calls this). task_end=t: right after task t's
    evaluation, engine dropped; None: mid-task, after an optimizer step."""
    payload = model_payload(trainer)
    trainer.log.flush()  # TensorBoard events up to this step are on disk before the checkpoint exists
    state = trainer.state_dict()
    shared = {"trainer.json": write_json(state), "config.json": write_json(config_to_dict(trainer.cfg)),
              "model.pt": write_torch(payload)}
    collective, kind = None, "none"
    if task_end is None:
        if trainer.deepspeed:
            kind = "deepspeed"
            # The frozen backbone is excluded: it is the pretrained file (and under ZeRO-3 it would be
            # every rank's partition of it, every checkpoint).
            collective = lambda folder: trainer.engine.save_checkpoint(  # noqa: E731
                folder, tag="engine", save_latest=False, exclude_frozen_parameters=True)
        else:
            kind = "torch"
            shared["optimizer.pt"] = write_torch(trainer.optimizer.state_dict())
            if trainer.acc.scaler is not None:  # fp16 without DeepSpeed: the loss scale is state too
                shared["scaler.pt"] = write_torch(trainer.acc.scaler.state_dict())
    meta = {"order": [trainer.global_step, 0 if task_end is None else 1], "global_step": trainer.global_step,
            "position": state["position"], "task_end": task_end, "world_size": trainer.world,
            "zero_stage": trainer.stage, "optimizer_state": kind, "threads": torch.get_num_threads(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = trainer.ckpt.save(checkpoint_name(trainer.global_step, task_end), meta, shared, write_torch(rng_state()),
                             collective)
    trainer.print(f"checkpoint {path}")
    return path


# ---------------------------------------------------------------------- resuming
def check_config(saved: dict, current: dict, where: str) -> None:
    a, b = flatten(saved), flatten(current)
    diff = sorted(k for k in set(a) | set(b) if k not in RESUME_MAY_DIFFER and a.get(k) != b.get(k))
    if diff:
        shown = "; ".join(f"'{k}': checkpoint {a.get(k)!r}, this run {b.get(k)!r}" for k in diff[:4])
        raise CheckpointError(f"checkpoint {where!r} was written by a run with another config ({shown}"
                              f"{'; ...' if len(diff) > 4 else ''}); resume with the original config "
                              f"({os.path.join(where, 'config.json')}) or start a new run under another name")


def _task_end_fallback(trainer) -> str:
    ends = [p for p, m in trainer.ckpt.scan()[0] if m.get("task_end") is not None]
    return (f"resume from the task-end checkpoint {ends[0]!r} (--resume PATH; exact with any world size)"
            if ends else "start the run again (no task-end checkpoint is left to resume from)")


def load_checkpoint(trainer, path: str) -> tuple:
    """Put `trainer` (freshly built) back where checkpoint `path` was taken. Returns the logs'
    position at the checkpoint, for the logger (MetricLogger resume). The optimizer/engine state of a mid-task checkpoint is
    loaded later, once build_engine has created the engine (load_engine_state)."""
    man = read_manifest(path)
    with open(os.path.join(path, "trainer.json")) as f:
        state = json.load(f)
    with open(os.path.join(path, "config.json")) as f:
        check_config(json.load(f), config_to_dict(trainer.cfg), path)
    if state["class_order"] != trainer.schedule.order:
        raise CheckpointError(f"checkpoint {path!r} has class order {state['class_order'][:8]}..., this run "
                              f"{trainer.schedule.order[:8]}...; resume with the original config")
    if state["mixed_precision"] != str(trainer.acc.mixed_precision):
        raise CheckpointError(f"checkpoint {path!r} was trained with mixed precision {state['mixed_precision']!r}, "
                              f"this launch resolves {trainer.acc.mixed_precision!r}; relaunch with the same "
                              f"accelerate config or set dist.mixed_precision={state['mixed_precision']!r}")
    payload = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    if not fingerprint_matches(payload["backbone_fingerprint"], trainer.fingerprint, trainer.model):
        raise CheckpointError(f"config field 'backbone.path': {trainer.cfg.backbone.path!r} does not hold the weights "
                              f"checkpoint {path!r} was trained on (fingerprint mismatch); use the original backbone")
    saved_world, kind = man["world_size"], man["optimizer_state"]
    this = f"{trainer.world} process(es), " + (f"DeepSpeed ZeRO-{trainer.stage}" if trainer.deepspeed
                                               else "no DeepSpeed")
    same_engine = trainer.deepspeed and trainer.stage == man["zero_stage"] and trainer.world == saved_world
    if kind == "deepspeed" and not same_engine:
        raise CheckpointError(
            f"checkpoint {path!r} was written mid-task by {saved_world} process(es) under DeepSpeed ZeRO-"
            f"{man['zero_stage']}: its optimizer state is sharded per rank and resumes only on the same number of "
            f"processes and ZeRO stage (this launch: {this}). Relaunch that way, or {_task_end_fallback(trainer)}")
    if kind == "torch" and trainer.deepspeed:
        raise CheckpointError(
            f"checkpoint {path!r} was written mid-task without DeepSpeed; this launch uses {this}. Relaunch without "
            f"DeepSpeed, or {_task_end_fallback(trainer)}")
    load_model_payload(trainer.model, payload, path)
    trainer.load_state_dict(state)
    if trainer.position[0] < trainer.cfg.cil.num_tasks:  # a finished run computes nothing more
        last = (state.get("topologies") or [{}])[-1]
        threads, line = resume_threads(last.get("threads"), torch.get_num_threads(), threads_source(),
                                       same_world=last.get("world_size", state["world_size"]) == trainer.world)
        torch.set_num_threads(threads)
        trainer.print(line)
    if kind != "none":
        trainer.pending_engine_state = path
    if saved_world == trainer.world:
        set_rng_state(torch.load(os.path.join(path, rank_file(trainer.rank)), weights_only=True))
    else:
        trainer.print(f"note: checkpoint written by {saved_world} process(es), resumed by {trainer.world}: the same "
                      f"global batches follow; per-rank RNG states are not restored (training draws from none: "
                      f"factors, order and augmentation are seeded explicitly)")
    # checkpoints from before event counting hold the metrics.jsonl length only
    return state.get("log_position") or {"tb_events": None, "jsonl_bytes": state.get("log_jsonl_bytes", 0)}


def load_engine_state(trainer, path: str) -> None:
    """Mid-task resume: the optimizer (and DeepSpeed engine) state, into the engine just built."""
    if trainer.deepspeed:
        load_path, _ = trainer.engine.load_checkpoint(path, tag="engine", load_module_strict=False,
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"checkpoint {path!r}: DeepSpeed could not load its engine state from engine/")
    else:
        trainer.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=True))
        if trainer.acc.scaler is not None and os.path.exists(os.path.join(path, "scaler.pt")):
            trainer.acc.scaler.load_state_dict(torch.load(os.path.join(path, "scaler.pt"), weights_only=True))


def plain_model(trainer):
    """The trained model with every tensor whole, for the final model file. Under ZeRO-3 the
    trainer's model is partitioned: rank 0 rebuilds an ordinary copy from the adapter state
    (gathered: collective) instead of gathering the whole backbone; None on the other ranks."""
    model = trainer.model
    if not any(is_partitioned(p) for p in model.parameters()):
        return model
    payload = model_payload(trainer)
    if not trainer.is_main:
        return None
    with plain_construction(trainer.acc):
        copy = trainer.fresh_model()
    load_model_payload(copy, payload, "the trained model")
    copy.events = model.events
    return copy
