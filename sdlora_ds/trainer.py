"""The continual-learning loop, layer by layer:

    run -> train_task(t) -> [before_task, build_engine, train_epoch x epochs, evaluate, after_task,
                             checkpoint]
    train_epoch -> train_step (one optimizer step) -> forward_backward (one micro-batch)

Every rank runs the same loop with the same decisions (class order, schedule, batch plan) derived
from the config; only rank 0 prints, logs and writes results. Where the run stands is `self.state`
(train_state.TrainState: position = (task, epoch, optimizer step within the epoch) of the next step,
global step, metrics, launch segments): that, with the model, the optimizer/engine, the RNG streams
and the loop's other state, is registered once as the checkpoint's parts (_register_parts;
checkpoint_parts.py saves and loads them, resume.py decides what a resume may change), so a resumed
run takes exactly the steps the uninterrupted one would have taken.

Around the loop: global rank 0 holds the run folder's lock (runlock.py) from before the checkpoint
is chosen until the run ends; under a launcher every rank stops if the launcher dies (ParentWatch);
the logs are put back to the checkpoint's position (logger.py), or started fresh.
"""
from __future__ import annotations

import itertools
import os
import time
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics as M
from .checkpoint import Checkpoints
from .checkpoint_parts import FOLDER, JSON, PER_RANK, TORCH, AdapterState, CheckpointParts, EngineState, Record, \
    RngStreams, Value
from .cil import TaskSchedule
from .config import RunConfig, config_to_dict
from .data import ShardIndex, build_loader
from .boundaries import BoundaryRecorder
from .data.remote import ReadPolicy, retry_count
from .distributed import (ParentWatch, PeerMonitor, configure_deepspeed_batch, gathered, held_elements,
                          lock_run_folder, make_accelerator, merged_eval, plain_construction, sum_across_ranks,
                          under_launcher, uses_deepspeed, zero_stage)
from .errors import resume_hint
from .export import FINAL_MODEL, plain_model, save_final_model
from .fileio import atomic_write_json
from .kernels import selfcheck
from .logger import MetricLogger, flatten
from .model import build_model
from .runlock import RunLock
from . import resume as S
from .run_record import RUN_CONFIG, backbone_fingerprint, backbone_record, config_record
from .train_state import RunShape, TrainState


class Trainer:
    def __init__(self, cfg: RunConfig, accelerator=None, resume: Optional[str] = None,
                 fresh_if_damaged: bool = False):
        """resume: None (a fresh run; refused if the run folder already holds checkpoints), 'auto'
        (the newest complete checkpoint of the run folder, if any; refused if every checkpoint there
        is damaged, unless fresh_if_damaged) or a checkpoint folder."""
        if fresh_if_damaged and resume != "auto":
            raise ValueError("--fresh-if-damaged goes with --resume auto (it says what to do when every checkpoint "
                             "of the run folder is damaged)")
        self.cfg = cfg
        self.lock, self.log, self.monitor, self.parent_watch = None, None, None, None
        self.acc = accelerator or make_accelerator(cfg)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process
        self.deepspeed, self.stage = uses_deepspeed(self.acc), zero_stage(self.acc)
        self.micro, self.accum = cfg.optim.batch_plan(self.world)  # ConfigError before any work
        configure_deepspeed_batch(self.acc, self.micro, self.accum)
        self.run_dir = cfg.run_dir
        if under_launcher():  # a launcher SIGKILLed (with its process group) must not leave orphans training
            self.parent_watch = ParentWatch(self.rank, self.world).start()
        try:
            self.lock = self._take_lock()  # before any work: a second trainer on this folder stops at once
            self._build()
            self._open_run(resume, fresh_if_damaged)
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        """The schedule, the data index, the model and the loop's state at its start."""
        cfg = self.cfg
        self.schedule = TaskSchedule.from_config(cfg.cil)
        # Bad inputs fail here, before the model is built or any training starts.
        self.retries_before = retry_count()  # results.json counts this launch's retries (tests run several)
        self.index = ShardIndex.load(cfg.data.index, verify_checksums=cfg.data.verify_checksums,
                                     shard_url=cfg.data.shard_url, policy=ReadPolicy.from_config(cfg.data, self.rank))
        self.index.check_against(cfg.cil.num_classes, [cfg.data.train_split, cfg.data.test_split])
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg)  # cfg.method: 'sdlora' or a baseline
        self.backbone = backbone_record(self.model, cfg)  # what was really loaded (results, config.json)
        # A resumed run must sit on the same backbone weights.
        self.fingerprint = backbone_fingerprint(self.model)
        self.lut = self.schedule.position_lookup(cfg.cil.num_classes)  # class id -> head row
        self.task_of_pos = self.schedule.task_of_position()
        self.state = TrainState()  # where the run stands: position, global step, metrics, launch segments
        self.engine = self.optimizer = None
        self.pending_optimizer = None  # mid-task resume: the checkpoint (Stored) to load the optimizer side from
        self.boundaries = BoundaryRecorder()  # task-boundary diagnostics (boundaries.py)
        self.log_resume: Optional[dict] = None  # the logs' position in the checkpoint resumed from
        self._probe_images: Optional[torch.Tensor] = None
        self.ckpt = Checkpoints(os.path.join(self.run_dir, "checkpoints"), cfg.train.keep_checkpoints, self.acc)
        self.parts = self._register_parts()

    def _take_lock(self) -> Optional[RunLock]:
        lock, notes = lock_run_folder(self.acc, self.run_dir)  # RunLockError on every rank if held
        for note in notes:
            self.print(note)
        return lock

    def _open_run(self, resume: Optional[str], fresh_if_damaged: bool) -> None:
        """Choose the checkpoint (or none), put the run and its logs back there, start the watchdog."""
        path, notes = self.ckpt.resolve(resume, fresh_if_damaged)
        for note in notes:
            self.print(note)
        if path:
            self.load_checkpoint(path)
        self.resumed_from = path
        if self.state.task < self.cfg.cil.num_tasks:  # a finished run re-run trains nothing: no new segment
            self.state.begin_segment(self.shape())
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            atomic_write_json(os.path.join(self.run_dir, RUN_CONFIG), config_record(self.cfg, self.backbone))
            self.ckpt.sweep()
        self.log = MetricLogger(self.run_dir, enabled=self.is_main, resume=self.log_resume)
        for note in self.log.notes:
            self.print(note)
        # names a dead peer when a collective fails; stops this rank if its ring successor is silent
        # for dist.timeout_s (whatever the backend)
        self.monitor = PeerMonitor(self.rank, self.world, timeout=self.cfg.dist.timeout_s).start() \
            if self.world > 1 else None

    def close(self) -> None:
        """Release what the trainer holds (idempotent): the logs, the run lock, the parent watch."""
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()
        if self.parent_watch is not None:
            self.parent_watch.stop()

    def plain_copy(self):
        """Another copy of the model as built in __init__ (a 'config' backbone is seeded the same),
        built outside ZeRO-3's partitioning; the caller's RNG is left alone."""
        with torch.random.fork_rng(devices=[]), plain_construction(self.acc):
            torch.manual_seed(self.cfg.seed)
            return build_model(self.cfg)

    # ------------------------------------------------------------------ state
    def shape(self) -> RunShape:
        """How this launch runs the loop (threads: the count in force now)."""
        return RunShape.of_launch(self.acc, self.micro, self.accum, self.deepspeed, self.stage)

    def _register_parts(self) -> CheckpointParts:
        """Every stateful part of the run, once, under its name, and where a checkpoint keeps it
        (the file names of every earlier checkpoint). Loaded in this order: the RNG streams last."""
        parts, trainer_json = CheckpointParts(), "trainer.json"
        parts.register("train_state", self.state, JSON, trainer_json, top_level=True)
        parts.register("events", Value(lambda: self.model.events, lambda v: setattr(self.model, "events", v)),
                       JSON, trainer_json)
        parts.register("class_order", Record(lambda: self.schedule.order), JSON, trainer_json)
        parts.register("global_batch", Record(lambda: self.cfg.optim.global_batch), JSON, trainer_json)
        # checkpoints from before event counting hold the metrics.jsonl length only
        parts.register("log_position", Value(lambda: self.log.position(), lambda v: setattr(self, "log_resume", v)),
                       JSON, trainer_json,
                       before=lambda doc: {"tb_events": None, "jsonl_bytes": doc.get("log_jsonl_bytes", 0)})
        parts.register("boundaries", self.boundaries, JSON, trainer_json, before=lambda doc: {})
        parts.register("config", Record(lambda: config_to_dict(self.cfg)), JSON, S.RESUME_CONFIG, top_level=True,
                       old_files=(S.RESUME_CONFIG_BEFORE,))
        parts.register("model", AdapterState(lambda: self.model, self.fingerprint), TORCH, "model.pt")
        if self.deepspeed:  # the optimizer side, mid-task only: a fresh optimizer starts every task
            parts.register("engine", EngineState(lambda: self.engine), FOLDER, "engine", mid_task="deepspeed")
        else:
            parts.register("optimizer", Value(lambda: self.optimizer.state_dict(),
                                              lambda sd: self.optimizer.load_state_dict(sd)),
                           TORCH, "optimizer.pt", mid_task="torch")
            if self.acc.scaler is not None:  # fp16
                parts.register("scaler", self.acc.scaler, TORCH, "scaler.pt", mid_task="torch")
        parts.register("rng", RngStreams(), PER_RANK)
        return parts

    def save_checkpoint(self, task_end: Optional[int] = None) -> str:
        """Checkpoint where the run stands (every rank; collective under ZeRO-3). task_end=t: after
        task t's evaluation, engine dropped; None: mid-task, after an optimizer step, with the
        optimizer's state."""
        self.log.flush()  # TensorBoard events up to this step are on disk before the checkpoint exists
        path = self.parts.save(self.ckpt, self.state, task_end)
        self.print(f"checkpoint {path}")
        return path

    def load_checkpoint(self, path: str) -> None:
        """Put the freshly built trainer back where checkpoint `path` was taken (the logs' position
        into self.log_resume). A mid-task checkpoint's optimizer side waits for build_engine."""
        r = S.load_checkpoint(path, self.parts, self.ckpt, self.fingerprint, self.model, config_to_dict(self.cfg),
                              self.schedule.order, self.shape(), self.rank)
        self.pending_optimizer = r.pending
        for line in r.notes:
            self.print(line)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        try:
            self.print(f"SD-LoRA {self.schedule.name()}: {self.world} process(es), micro-batch {self.micro} x "
                       f"accumulation {self.accum} x world {self.world} = global batch {self.cfg.optim.global_batch}"
                       f" | {'DeepSpeed ZeRO-%d' % self.stage if self.deepspeed else 'no DeepSpeed'}"
                       f" | mixed precision {self.acc.mixed_precision}")
            self.print(f"class order: {self.schedule.order}")
            if self.resumed_from:
                self.print(S.resume_line(self.resumed_from, self.state.position, self.state.global_step, self.cfg))
            for t in range(self.state.task, self.cfg.cil.num_tasks):
                self.train_task(t)
            results = self.finish()
            if self.monitor is not None:
                self.monitor.stop()
        except Exception as e:
            if self.monitor is not None:  # name the dead peer and exit now, instead of hanging in teardown
                self.monitor.abort(e, resume_hint(self.ckpt.root))
            raise
        finally:
            self.close()
        return results

    def train_task(self, t: int) -> None:
        start = time.time() - self.state.task_elapsed
        if self.model.task < t:  # not when resuming mid-task: the checkpoint's model is already at task t
            self.before_task(t)
        self.build_engine(t)
        _, first_epoch, first_step = self.state.position  # (t, 0, 0) unless resuming mid-task
        if (first_epoch, first_step) == (0, 0):  # the boundary alone: task t's direction is still zero
            self.log_boundary(t, self.boundaries.task_start(t, self.probe_features()), "feature_change_at_boundary")
        if (first_epoch, first_step) == (0, 0) and "task_start" in self.model.observes:
            self.observe_task(t, "task_start")  # e.g. NCM's class means (its whole training)
        for epoch in range(first_epoch, self.cfg.optim.epochs if self.model.trains else 0):
            self.train_epoch(t, epoch, first_step=first_step if epoch == first_epoch else 0, start=start)
        if "task_end" in self.model.observes:
            self.observe_task(t, "task_end")
        self.evaluate(t)
        self.log_boundary(t, self.boundaries.task_end(t, self.probe_features()), "feature_change_after_next_task")
        self.after_task(t)
        self.state.task_done(t, time.time() - start)
        self.save_checkpoint(task_end=t)

    def before_task(self, t: int) -> None:
        """Grow the model for task t. start_task reads the previous task's trainable tensors (factors
        to freeze, magnitudes, classifier rows), partitioned under ZeRO-3: gathered for the call."""
        n_events = len(self.model.events)
        previous = self.model.trainable_parameters() if self.model.task >= 0 else []
        with gathered(previous):
            self.model.start_task(t, self.schedule.size(t))
        rec = self.boundaries.adapters(getattr(self.model, "boundary", None) if t > 0 else None)
        for g, metrics in (rec or {}).get("adapters", {}).items():  # TensorBoard step = the task it leads into
            for m in ("norm_b", "norm_ba", "jump"):
                self.log.scalar(f"boundary/{g}_{m}_median", metrics[m]["median"], t)
        for ev in self.model.events[n_events:]:  # e.g. SD-LoRA-KD merges decided at the task boundary
            self.log.text("model/events", str(ev), t)
            for tag, value in ev.get("scalars", {}).items():
                self.log.scalar(tag, value, t)
        self.print(f"task {t}: classes {self.schedule.classes(t)} | "
                   f"{sum(p.numel() for p in self.model.trainable_parameters()):,} trainable parameters")

    def build_engine(self, t: int) -> None:
        """A fresh optimizer + engine over task t's trainable set (it changes every task). When
        resuming mid-task, the optimizer/engine state of the checkpoint is loaded into it."""
        self.model.set_trainable()
        if not self.model.trains:  # nothing to optimise: the plain model on its device
            self.engine, self.optimizer = self.model.to(self.acc.device), None
            return
        o = self.cfg.optim
        optimizer = torch.optim.SGD(self.model.trainable_parameters(), lr=o.lr, momentum=o.momentum,
                                    weight_decay=o.weight_decay)
        self.engine, self.optimizer = self.acc.prepare(self.model, optimizer)
        if self.stage == 3:
            held, total, parts = held_elements(self.model)
            off = [w for w, c in (("parameters", self.engine.zero_offload_param()),
                                  ("optimizer", self.engine.zero_offload_optimizer())) if c and c.device != "none"]
            self.print(f"ZeRO-3: rank 0 stores {held:,} of {total:,} parameter elements ({parts} partitioned tensors)"
                       + (f"; offloaded to CPU: {', '.join(off)}" if off else ""))
        if self.pending_optimizer is not None:
            self.parts.load(self.pending_optimizer, self.parts.names(mid_task=True))
            self.pending_optimizer = None

    def train_epoch(self, t: int, epoch: int, first_step: int = 0, start: float = 0.0) -> None:
        # Resuming mid-epoch: the epoch's loader is rebuilt and its first steps skipped unread.
        loader = self.loader(t, train=True, epoch=epoch, start_batch=first_step * self.accum)
        n_micro = len(loader) + first_step * self.accum
        n_steps = -(-n_micro // self.accum)
        if self.cfg.optim.max_steps_per_epoch is not None:
            n_steps = min(n_steps, self.cfg.optim.max_steps_per_epoch)
        self.engine.train()
        bar = tqdm(total=n_steps, initial=first_step, desc=f"task {t} epoch {epoch + 1}/{self.cfg.optim.epochs}",
                   disable=not self.is_main, leave=False, dynamic_ncols=True)
        it = iter(loader)
        every = self.cfg.train.checkpoint_every
        for step in range(first_step, n_steps):
            group = [next(it) for _ in range(min(self.accum, n_micro - step * self.accum))]
            loss = self.train_step(t, group)
            self.state.position = (t, epoch, step + 1)
            if self.is_main and self.state.global_step % self.cfg.train.log_every == 0:
                bar.write(f"step {self.state.global_step} | task {t} epoch {epoch + 1}/{self.cfg.optim.epochs} | "
                          f"loss {loss:.4f}")
            if every and self.state.global_step % every == 0:
                self.state.task_elapsed = time.time() - start
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.close()
        self.state.position = (t, epoch + 1, 0)
        del it, loader

    def train_step(self, t: int, micro_batches: list) -> float:
        """One optimizer step over `micro_batches` (gradient accumulation inside).

        The loss is the mean over every sample of the step on every rank: each micro-batch adds its
        summed loss divided by this rank's sample count of the step, and DDP/DeepSpeed average over
        ranks (which hold equal counts, see data/loader.py). A short last micro-batch is therefore
        weighted by its size, and 1 rank or N ranks with the same global batches take the same step."""
        known = self.schedule.start(t)
        n_local = sum(len(labels) for _, labels in micro_batches)
        total = torch.zeros((), dtype=torch.float64)
        terms: dict = {}  # the model's extra loss terms (model.loss_terms), weighted and summed over the step
        for i, (images, labels) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            loss_sum, micro_terms = self.forward_backward(images, labels, known, n_local, sync=last)
            total += loss_sum
            for name, value in micro_terms.items():
                terms[name] = terms.get(name, 0.0) + value
        if not self.deepspeed:  # DeepSpeed stepped inside forward_backward, at the boundary
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # Mean over all ranks for the log (every rank computes it: same number everywhere).
        loss = float(sum_across_ranks(self.acc, total.float())) / (n_local * self.world)
        self.state.step_done(loss)
        step = self.state.global_step
        self.log.scalar("train/loss", loss, step)
        self.log.scalar("train/lr", self.optimizer.param_groups[0]["lr"], step)
        self.log.scalar("train/task", t, step)
        if terms:  # one collective for all terms; the same names on every rank (the same model)
            names = sorted(terms)
            means = sum_across_ranks(self.acc, torch.stack([terms[n] for n in names]).float()) / self.world
            for name, value in zip(names, means.tolist()):
                self.log.scalar(f"train/{name}", value, step)
        logged = step % self.cfg.train.log_every == 0 or step == 1
        mags = getattr(self.model, "magnitudes", None) if logged else None  # self.model: the module the engine wraps
        if mags is not None:
            values = [float(v) for v in mags().detach().float().cpu()]  # (m + k) per task so far
            self.state.magnitude_log.append((step, values))
            for j, v in enumerate(values):
                self.log.scalar(f"magnitude/task_{j}", v, step)
        return loss

    def forward_backward(self, images, labels, known: int, n_local: int, sync: bool) -> tuple:
        """Cross-entropy on the current task's logits only: logits[:, known:] vs position - known, plus
        the model's extra loss terms (model/base.py loss_terms), each weighted by this micro-batch's
        share of the step's samples on this rank. Returns the summed (not mean) cross-entropy of the
        micro-batch and {name: weighted term}, detached."""
        images = images.to(self.acc.device, non_blocking=True)
        target = self.lut[labels].to(self.acc.device) - known  # (B,) in [0, task size)
        # DDP: no gradient all-reduce before the step's last micro-batch (DeepSpeed: see below)
        ctx = self.acc.no_sync(self.engine) if not (self.deepspeed or sync) else nullcontext()
        with ctx, self.acc.autocast():
            logits, terms = self.engine(images, loss_terms=True)  # (B, C_seen), {name: scalar}
            loss_sum = F.cross_entropy(logits[:, known:].float(), target, reduction="sum")
        loss = loss_sum / n_local
        weighted = {}
        for name, value in terms.items():  # none for most methods: their loss is exactly the cross-entropy
            weighted[name] = value.float() * (len(labels) / n_local)
            loss = loss + weighted[name]
        if self.deepspeed:
            # The engine is driven directly, not through accelerator.backward: accelerate's wrapper
            # overwrites the accumulation boundary with its own sync flag (True outside
            # accelerator.accumulate) and would step after EVERY micro-batch. Our boundary is the last
            # micro-batch of the step (which may be a short group at the end of an epoch), and the loss
            # is already divided by the step's sample count (scale_wrt_gas=False: no second division).
            self.engine.set_gradient_accumulation_boundary(sync)
            self.engine.backward(loss, scale_wrt_gas=False)
            if sync:
                self.engine.step()  # reduce (ZeRO: reduce-scatter), optimizer step, zero grads
        else:
            self.acc.backward(loss)
        return loss_sum.detach().double().cpu(), {name: v.detach().cpu() for name, v in weighted.items()}

    # ------------------------------------------------------------------ passes over a task's data and diagnostics
    @torch.no_grad()
    def observe_task(self, t: int, phase: str) -> None:
        """The model's pass over task t's train images at `phase` (model/base.py: observe/observed):
        test transform, each image once across ranks; every rank runs every batch (a collective under
        ZeRO-3: the engine's hooks gather the weights) and the model's sums are reduced over ranks."""
        model = self.acc.unwrap_model(self.engine)
        known = self.schedule.start(t)
        d = self.cfg.data
        loader = build_loader(self.index, d, split=d.train_split, class_ids=self.schedule.classes(t), train=False,
                              batch_size=self.cfg.train.eval_batch, rank=self.rank, world_size=self.world,
                              seed=self.cfg.seed * 100 + t)
        was_training = model.training
        model.eval()
        for images, labels in tqdm(loader, desc=f"{phase} pass over task {t}", disable=not self.is_main, leave=False):
            keep = labels >= 0  # padding samples keep batch counts equal across ranks
            rows = self.lut[labels.clamp_min(0)] - known
            with self.acc.autocast():
                model.observe(phase, t, images.to(self.acc.device), rows, keep)
        note = model.observed(phase, t, lambda x: sum_across_ranks(self.acc, x))
        model.train(was_training)
        if note:
            self.print(note)

    def probe_images(self) -> Optional[torch.Tensor]:
        """The first train.probe_size test images of task 0's classes (same on every rank); None if off."""
        size = self.cfg.train.probe_size
        if size == 0:
            return None
        if self._probe_images is None:
            d = self.cfg.data
            loader = build_loader(self.index, d, split=d.test_split, class_ids=self.schedule.classes(0), train=False,
                                  batch_size=size, rank=0, world_size=1, seed=0, num_workers=0)
            images, labels = next(iter(loader))
            self._probe_images = images[labels >= 0]
        return self._probe_images

    @torch.no_grad()
    def probe_features(self) -> Optional[torch.Tensor]:
        """CLS features (P, d) of the probe images under the current model (every rank runs it: under
        ZeRO-3 the modules' hooks gather the weights, a collective)."""
        images = self.probe_images()
        if images is None:
            return None
        model = self.acc.unwrap_model(self.engine)
        was_training = model.training
        model.eval()
        with self.acc.autocast():
            f = model.features(images.to(self.acc.device)).float().cpu()
        model.train(was_training)
        return f

    def log_boundary(self, t: int, value: Optional[float], name: str) -> None:
        if value is not None:
            self.log.scalar(f"boundary/{name}", value, t)

    def after_task(self, t: int) -> None:
        """Drop the engine/optimizer of task t: the next task trains another set of tensors."""
        self.model = self.acc.unwrap_model(self.engine)
        self.engine = self.optimizer = None
        self.acc.free_memory()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, t: int) -> None:
        """Accuracy on all classes seen so far; every test sample counted once across ranks.
        Runs while task t's engine exists: under ZeRO-3 only the engine's hooks gather the weights a
        forward needs, and every forward is a collective (the test loader gives every rank the same
        number of batches: padding samples with label -1)."""
        loader = self.loader(t, train=False)
        correct = torch.zeros(t + 1, dtype=torch.long)
        count = torch.zeros(t + 1, dtype=torch.long)
        forward = self.engine if self.stage == 3 else self.acc.unwrap_model(self.engine)
        self.engine.eval()
        cap = self.cfg.train.eval_max_batches  # a sample (dry run): the same count on every rank
        batches = loader if cap is None else itertools.islice(loader, cap)
        with merged_eval(self.acc.unwrap_model(self.engine)):
            for images, labels in tqdm(batches, desc=f"eval after task {t}", disable=not self.is_main, leave=False):
                keep = labels >= 0  # padding samples (label -1) keep batch counts equal, never count
                with self.acc.autocast():
                    logits = forward(images.to(self.acc.device))
                pred = logits.argmax(dim=1).cpu()
                pos = self.lut[labels.clamp_min(0)]
                task = self.task_of_pos[pos]
                correct += torch.bincount(task[keep], weights=(pred == pos)[keep].long(), minlength=t + 1).long()
                count += torch.bincount(task[keep], minlength=t + 1)
        self.engine.train()
        correct, count = sum_across_ranks(self.acc, correct), sum_across_ranks(self.acc, count)
        expected = self.index.count(self.cfg.data.test_split, self.schedule.seen_classes(t))
        # Fewer only when bad test samples were tolerated (data.bad_sample_tolerance): they are reported.
        assert int(count.sum()) <= expected, f"evaluated {int(count.sum())} test samples, index has {expected}"
        if cap is not None:
            self.print(f"evaluation sample (train.eval_max_batches={cap}): {int(count.sum())} of {expected} test "
                       f"images, per task {count.tolist()}")
        elif int(count.sum()) < expected:
            self.print(f"warning: {expected - int(count.sum())} bad test sample(s) skipped in this evaluation")
        row = (100.0 * correct.double() / count.clamp_min(1).double()).tolist()
        st = self.state
        st.acc_matrix.append(row)
        st.acc_all.append(100.0 * float(correct.sum()) / float(count.sum()))
        self.log.scalar("eval/acc_all_seen", st.acc_all[-1], t)
        for j, v in enumerate(row):
            self.log.scalar(f"eval/acc_task_{j}", v, t)
        self.log.acc_matrix(st.acc_matrix, st.acc_all, t)
        self.print(f"after task {t}: accuracy on all {self.schedule.end(t)} seen classes {st.acc_all[-1]:.2f}% | "
                   f"per task [{', '.join(M.ends([str(round(v, 2)) for v in row], M.CELL_TEXT_MAX_TASKS))}]")

    def loader(self, t: int, train: bool, epoch: int = 0, start_batch: int = 0):
        d = self.cfg.data
        classes = self.schedule.classes(t) if train else self.schedule.seen_classes(t)
        return build_loader(self.index, d, split=d.train_split if train else d.test_split, class_ids=classes,
                            train=train, batch_size=self.micro if train else self.cfg.train.eval_batch,
                            rank=self.rank, world_size=self.world, seed=self.cfg.seed * 100 + t, epoch=epoch,
                            start_batch=start_batch)

    # ------------------------------------------------------------------ end of run
    def finish(self) -> dict:
        st, shape = self.state, self.shape()
        summary = M.summarize(st.acc_matrix, st.acc_all)
        config = config_record(self.cfg, self.backbone)
        results = {"method": self.cfg.method, "setting": self.schedule.name(), "dataset": self.index.dataset,
                   "backbone_weights": self.cfg.backbone.weights_name or self.cfg.backbone.path,
                   "backbone": self.backbone, "class_order": self.schedule.order, **summary,
                   # this (last) launch; every segment of a resumed run: "topologies"
                   "world_size": shape.world_size, "global_batch": self.cfg.optim.global_batch,
                   "micro_batch": shape.micro_batch, "grad_accum": shape.grad_accum, "zero_stage": shape.zero_stage,
                   "mixed_precision": shape.mixed_precision, "topologies": st.topologies,
                   "task_seconds": st.task_times, "events": self.model.events,
                   "kernel_selfcheck": selfcheck.results(), "loss_log": st.loss_log,
                   "boundaries": self.boundaries.records, "magnitude_log": st.magnitude_log, "config": config}
        # remote reads retried in this launch, all ranks (sdlora_ds/data/remote.py; 0 with local shards)
        retried = torch.tensor([retry_count() - self.retries_before])
        results["data_read_retries"] = int(sum_across_ranks(self.acc, retried)[0])
        final_model = plain_model(self.model, self.fingerprint, self.is_main,  # collective under ZeRO-3
                                  self.plain_copy)  # None on ranks other than 0 there
        if self.is_main:
            path = os.path.join(self.run_dir, "results.json")
            atomic_write_json(path, results)
            last = len(st.acc_all) - 1
            for k in ("avg_acc", "last_acc", "forgetting", "bwt"):
                self.log.scalar(f"final/{k}", summary[k], last)
            hparams = {**flatten(config), "backbone.num_parameters": self.backbone["num_parameters"]}
            self.log.hparams(hparams, {k: summary[k] for k in ("avg_acc", "last_acc", "forgetting", "bwt")}, last)
            self.log.close()
            print("\naccuracy matrix (%):\n" + M.format_matrix(st.acc_matrix, st.acc_all))
            print(f"Avg Acc {summary['avg_acc']:.2f} | Last Acc {summary['last_acc']:.2f} | "
                  f"forgetting {summary['forgetting']:.2f} | BWT {summary['bwt']:.2f}")
            print(f"results: {path}")
            # The final model for sdlora-export; the same state is in the last checkpoint
            # (checkpoints/step-*-task{T-1}-end), which --resume auto turns back into this file.
            save_final_model(os.path.join(self.run_dir, FINAL_MODEL), final_model, self.cfg, self.schedule.order,
                             self.index.class_names, fingerprint=self.fingerprint)
        self.acc.wait_for_everyone()
        return results

    def print(self, *args) -> None:
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))
