"""The continual-learning loop, layer by layer:

    run -> train_task(t) -> [before_task, train_epoch x epochs, evaluate, after_task]
    train_epoch -> train_step (one optimizer step) -> forward_backward (one micro-batch)

Every rank runs the same loop with the same decisions (class order, schedule, batch plan) derived
from the config; only rank 0 prints, logs and writes results.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics as M
from .cil import TaskSchedule
from .config import RunConfig, config_to_dict, dump_config
from .data import ShardIndex, build_loader
from .distributed import configure_deepspeed_batch, make_accelerator, sum_across_ranks, uses_deepspeed
from .logger import MetricLogger, flatten
from .export import FINAL_MODEL, save_final_model
from .model import build_model


class Trainer:
    def __init__(self, cfg: RunConfig, accelerator=None):
        self.cfg = cfg
        self.acc = accelerator or make_accelerator(cfg)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process
        self.micro, self.accum = cfg.optim.batch_plan(self.world)  # ConfigError before any work
        configure_deepspeed_batch(self.acc, self.micro, self.accum)
        self.schedule = TaskSchedule.from_config(cfg.cil)
        # Bad inputs fail here, before the model is built or any training starts.
        self.index = ShardIndex.load(cfg.data.index, verify_checksums=cfg.data.verify_checksums)
        self.index.check_against(cfg.cil.num_classes, [cfg.data.train_split, cfg.data.test_split])
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg)  # cfg.method: 'sdlora' or a baseline
        self.lut = self.schedule.position_lookup(cfg.cil.num_classes)  # class id -> head row
        self.task_of_pos = self.schedule.task_of_position()
        self.run_dir = cfg.run_dir
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            dump_config(cfg, os.path.join(self.run_dir, "config.json"))
        self.log = MetricLogger(self.run_dir, enabled=self.is_main)
        self.global_step = 0
        self.acc_matrix: list = []  # acc[t][j], percent
        self.acc_all: list = []
        self.loss_log: list = []  # (global step, loss) of every optimizer step
        self.task_times: list = []
        self.engine = self.optimizer = None

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        self.print(f"SD-LoRA {self.schedule.name()}: {self.world} process(es), micro-batch {self.micro} x "
                   f"accumulation {self.accum} x world {self.world} = global batch {self.cfg.optim.global_batch}")
        self.print(f"class order: {self.schedule.order}")
        for t in range(len(self.acc_matrix), self.cfg.cil.num_tasks):
            self.train_task(t)
        return self.finish()

    def train_task(self, t: int) -> None:
        start = time.time()
        self.before_task(t)
        for epoch in range(self.cfg.optim.epochs):
            self.train_epoch(t, epoch)
        self.after_task(t)
        self.evaluate(t)
        self.task_times.append(time.time() - start)

    def before_task(self, t: int) -> None:
        """Grow the model for task t and build a fresh optimizer + engine over its trainable set."""
        n_events = len(self.model.events)
        self.model.start_task(t, self.schedule.size(t))
        for ev in self.model.events[n_events:]:  # e.g. SD-LoRA-KD merges decided at the task boundary
            self.log.text("model/events", str(ev), t)
            for tag, value in ev.get("scalars", {}).items():
                self.log.scalar(tag, value, t)
        self.model.set_trainable()
        params = self.model.trainable_parameters()
        o = self.cfg.optim
        optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        self.engine, self.optimizer = self.acc.prepare(self.model, optimizer)
        n_train = sum(p.numel() for p in params)
        self.print(f"task {t}: classes {self.schedule.classes(t)} | {n_train:,} trainable parameters")

    def train_epoch(self, t: int, epoch: int) -> None:
        loader = self.loader(t, train=True, epoch=epoch)
        n_micro = len(loader)
        n_steps = -(-n_micro // self.accum)
        if self.cfg.optim.max_steps_per_epoch is not None:
            n_steps = min(n_steps, self.cfg.optim.max_steps_per_epoch)
        self.engine.train()
        bar = tqdm(total=n_steps, desc=f"task {t} epoch {epoch + 1}/{self.cfg.optim.epochs}",
                   disable=not self.is_main, leave=False, dynamic_ncols=True)
        it = iter(loader)
        for step in range(n_steps):
            group = [next(it) for _ in range(min(self.accum, n_micro - step * self.accum))]
            loss = self.train_step(t, group)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.close()
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
        for i, (images, labels) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            total += self.forward_backward(images, labels, known, n_local, sync=last)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Mean over all ranks for the log (every rank computes it: same number everywhere).
        loss = float(sum_across_ranks(self.acc, total.float())) / (n_local * self.world)
        self.global_step += 1
        self.loss_log.append((self.global_step, loss))
        self.log.scalar("train/loss", loss, self.global_step)
        self.log.scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.global_step)
        self.log.scalar("train/task", t, self.global_step)
        return loss

    def forward_backward(self, images, labels, known: int, n_local: int, sync: bool) -> torch.Tensor:
        """Cross-entropy on the current task's logits only: logits[:, known:] vs position - known.
        Returns the summed (not mean) loss of the micro-batch, detached."""
        images = images.to(self.acc.device, non_blocking=True)
        target = self.lut[labels].to(self.acc.device) - known  # (B,) in [0, task size)
        kwargs = {}
        if uses_deepspeed(self.acc):
            # DeepSpeed steps at its own accumulation boundary; tell it where ours is (short last
            # group), and do not let it divide by gradient_accumulation_steps again.
            self.engine.set_gradient_accumulation_boundary(sync)
            kwargs["scale_wrt_gas"] = False
            ctx = nullcontext()
        else:
            ctx = nullcontext() if sync else self.acc.no_sync(self.engine)
        with ctx, self.acc.autocast():
            logits = self.engine(images)  # (B, C_seen)
            loss_sum = F.cross_entropy(logits[:, known:].float(), target, reduction="sum")
        self.acc.backward(loss_sum / n_local, **kwargs)
        return loss_sum.detach().double().cpu()

    def after_task(self, t: int) -> None:
        """Drop the engine/optimizer of task t: the next task trains another set of tensors."""
        self.model = self.acc.unwrap_model(self.engine)
        self.engine = self.optimizer = None
        self.acc.free_memory()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, t: int) -> None:
        """Accuracy on all classes seen so far; every test sample counted once across ranks."""
        loader = self.loader(t, train=False)
        correct = torch.zeros(t + 1, dtype=torch.long)
        count = torch.zeros(t + 1, dtype=torch.long)
        self.model.eval()
        with self.model.merged_eval():
            for images, labels in tqdm(loader, desc=f"eval after task {t}", disable=not self.is_main, leave=False):
                keep = labels >= 0  # padding samples (label -1) keep batch counts equal, never count
                with self.acc.autocast():
                    logits = self.model(images.to(self.acc.device))
                pred = logits.argmax(dim=1).cpu()
                pos = self.lut[labels.clamp_min(0)]
                task = self.task_of_pos[pos]
                correct += torch.bincount(task[keep], weights=(pred == pos)[keep].long(), minlength=t + 1).long()
                count += torch.bincount(task[keep], minlength=t + 1)
        self.model.train()
        correct, count = sum_across_ranks(self.acc, correct), sum_across_ranks(self.acc, count)
        expected = self.index.count(self.cfg.data.test_split, self.schedule.seen_classes(t))
        # Fewer only when bad test samples were tolerated (data.bad_sample_tolerance): they are reported.
        assert int(count.sum()) <= expected, f"evaluated {int(count.sum())} test samples, index has {expected}"
        if int(count.sum()) < expected:
            self.print(f"warning: {expected - int(count.sum())} bad test sample(s) skipped in this evaluation")
        row = (100.0 * correct.double() / count.clamp_min(1).double()).tolist()
        self.acc_matrix.append(row)
        self.acc_all.append(100.0 * float(correct.sum()) / float(count.sum()))
        self.log.scalar("eval/acc_all_seen", self.acc_all[-1], t)
        for j, v in enumerate(row):
            self.log.scalar(f"eval/acc_task_{j}", v, t)
        self.log.acc_matrix(self.acc_matrix, t)
        self.print(f"after task {t}: accuracy on all {self.schedule.end(t)} seen classes {self.acc_all[-1]:.2f}% | "
                   f"per task {[round(v, 2) for v in row]}")

    def loader(self, t: int, train: bool, epoch: int = 0):
        d = self.cfg.data
        classes = self.schedule.classes(t) if train else self.schedule.seen_classes(t)
        return build_loader(self.index, d, split=d.train_split if train else d.test_split, class_ids=classes,
                            train=train, batch_size=self.micro if train else self.cfg.train.eval_batch,
                            rank=self.rank, world_size=self.world, seed=self.cfg.seed * 100 + t, epoch=epoch)

    # ------------------------------------------------------------------ end of run
    def finish(self) -> dict:
        summary = M.summarize(self.acc_matrix, self.acc_all)
        results = {"method": self.cfg.method, "setting": self.schedule.name(), "dataset": self.index.dataset,
                   "backbone_weights": self.cfg.backbone.weights_name or self.cfg.backbone.path,
                   "class_order": self.schedule.order, **summary, "world_size": self.world,
                   "global_batch": self.cfg.optim.global_batch, "micro_batch": self.micro,
                   "grad_accum": self.accum, "task_seconds": self.task_times,
                   "events": self.model.events, "loss_log": self.loss_log, "config": config_to_dict(self.cfg)}
        if self.is_main:
            path = os.path.join(self.run_dir, "results.json")
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(path + ".tmp", path)
            self.log.scalar("final/avg_acc", summary["avg_acc"], len(self.acc_all) - 1)
            self.log.scalar("final/last_acc", summary["last_acc"], len(self.acc_all) - 1)
            self.log.scalar("final/forgetting", summary["forgetting"], len(self.acc_all) - 1)
            self.log.scalar("final/bwt", summary["bwt"], len(self.acc_all) - 1)
            self.log.hparams(flatten(config_to_dict(self.cfg)),
                             {k: summary[k] for k in ("avg_acc", "last_acc", "forgetting", "bwt")})
            self.log.close()
            print("\naccuracy matrix (%):\n" + M.format_matrix(self.acc_matrix, self.acc_all))
            print(f"Avg Acc {summary['avg_acc']:.2f} | Last Acc {summary['last_acc']:.2f} | "
                  f"forgetting {summary['forgetting']:.2f} | BWT {summary['bwt']:.2f}")
            print(f"results: {path}")
            # The final model for launch/export.py (issue 4 folds this into the checkpoint format).
            save_final_model(os.path.join(self.run_dir, FINAL_MODEL), self.model, self.cfg, self.schedule.order,
                             self.index.class_names)
        self.acc.wait_for_everyone()
        return results

    def print(self, *args) -> None:
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))
