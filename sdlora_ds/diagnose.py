"""Where a finished run's errors are: inside a task, or between tasks.

Class-incremental accuracy (argmax over every seen class) mixes two failures: confusing two classes
of the same task, and predicting a class of another task (the head blocks trained by the masked
loss of different tasks are not calibrated against each other). This module re-evaluates a
finished run's final model on the test split and separates them:

  * task-agnostic accuracy: what the run reports (argmax over all seen classes);
  * task-aware accuracy: argmax restricted to the sample's own task (a task-id oracle, NOT a
    continual-learning result: an upper bound that no rehearsal-free method gets at test time);
  * where the inter-task errors go: into an older or a newer task's classes.

A large gap between the two accuracies says the run is limited by cross-task calibration of the
head, not by what the backbone can separate. Reads only the run folder (config.json,
final_model.pt) and the shard index: it works on runs copied back from a cluster.
"""
from __future__ import annotations

import torch

from .cil import TaskSchedule
from .data import ShardIndex, build_loader


def error_split(logits: torch.Tensor, pos: torch.Tensor, schedule: TaskSchedule) -> dict:
    """Counts per task of the true class: samples, agnostic/aware correct, errors into older/newer tasks.

    logits: (B, C) over head rows (order positions), pos: (B,) the true position."""
    task_of = schedule.task_of_position()[: logits.shape[1]]
    T = int(task_of.max()) + 1
    true_task = task_of[pos]
    pred = logits.argmax(dim=1)  # (B,)
    # task-aware: mask every row outside the sample's task
    own = task_of.unsqueeze(0) == true_task.unsqueeze(1)  # (B, C)
    aware = logits.masked_fill(~own, float("-inf")).argmax(dim=1)
    pred_task = task_of[pred]

    def per_task(mask: torch.Tensor) -> torch.Tensor:
        return torch.bincount(true_task[mask], minlength=T)
    every = torch.ones_like(pos, dtype=torch.bool)
    return {"count": per_task(every), "agnostic": per_task(pred == pos), "aware": per_task(aware == pos),
            "into_older": per_task(pred_task < true_task), "into_newer": per_task(pred_task > true_task)}


def summarize(counts: dict) -> dict:
    """Percentages per task and over all samples from error_split counts (summed over batches)."""
    n = counts["count"].double().clamp_min(1)
    out = {k: (100.0 * counts[k].double() / n).tolist() for k in counts if k != "count"}
    total = float(counts["count"].sum())
    out.update({f"{k}_all": 100.0 * float(counts[k].sum()) / max(total, 1.0) for k in counts if k != "count"})
    out["count"] = counts["count"].tolist()
    return out


@torch.no_grad()
def diagnose_run(run_dir: str, batch_size: int = 100) -> dict:
    """Re-evaluate run_dir's final model on every test class seen; returns summarize(...)."""
    from .export import load_final_model
    model, cfg, _ = load_final_model(run_dir)
    schedule = TaskSchedule.from_config(cfg.cil)
    index = ShardIndex.load(cfg.data.index, shard_url=cfg.data.shard_url)
    lut = schedule.position_lookup(cfg.cil.num_classes)
    seen = schedule.seen_classes(cfg.cil.num_tasks - 1)
    loader = build_loader(index, cfg.data, split=cfg.data.test_split, class_ids=seen, train=False,
                          batch_size=batch_size, rank=0, world_size=1, seed=0, num_workers=0)
    total = None
    with model.merged_eval():
        for images, labels in loader:
            keep = labels >= 0  # loader padding
            logits = model(images[keep])
            counts = error_split(logits, lut[labels[keep]], schedule)
            total = counts if total is None else {k: total[k] + counts[k] for k in counts}
    assert total is not None, "no test samples"
    return summarize(total)


def format_diagnosis(d: dict) -> str:
    rows = ["task   n     agnostic  task-aware  errors->older  errors->newer"]
    for j, n in enumerate(d["count"]):
        rows.append(f"T{j:<4} {n:<5} {d['agnostic'][j]:8.2f}  {d['aware'][j]:10.2f}  {d['into_older'][j]:13.2f}  "
                    f"{d['into_newer'][j]:13.2f}")
    rows.append(f"all    {sum(d['count']):<5} {d['agnostic_all']:8.2f}  {d['aware_all']:10.2f}  "
                f"{d['into_older_all']:13.2f}  {d['into_newer_all']:13.2f}")
    return "\n".join(rows)
