"""Task-boundary diagnostics: what happens to the model when a task ends (results.json 'boundaries').

SD-LoRA trains task i's update as m_i B_i A_i (B_i starts at zero) and, when the task ends, the same
direction enters the model as (m0 + k_i) B_i A_i / (||B_i|| ||A_i||) with the magnitudes re-created
at m0 ('normalize', the paper). Its contribution therefore changes at the boundary by the jump
factor (m0 + k_i) / (m_i ||B_i|| ||A_i||): large when a short task leaves B_i small. Two records per
boundary i -> i+1:

1. the adapters (SD-LoRA only; model.boundary, filled by SDLoRAModel at the boundary): per adapted
   projection ||B_i||_F, ||A_i||_F, ||B_i A_i||_F, the scalar multiplying the raw B_i A_i just before
   (coef_before = m_i + k_i) and just after (coef_after) the freeze, and jump = |after / before|;
   summarised over blocks as min / median / max, for the query and value projections separately;
   plus m_end, every magnitude (m + k) at the end of task i.
2. the features (every method): a fixed probe of `train.probe_size` test images of task 0's classes
   (seen at every boundary); the relative change of their CLS features (Frobenius over the batch,
   ||F_after - F_before|| / ||F_before||) from the end of task i to the start of task i+1 (the
   boundary alone: the new direction starts at zero) and to the end of task i+1 (boundary + training).

`BoundaryRecorder` holds the records and the last task-end features; it is part of the trainer's
checkpoint state (state_dict / load_state_dict), so a resumed run writes the same section.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional

import torch

from .metrics import CELL_TEXT_MAX_TASKS, ends

METRICS = ("norm_b", "norm_a", "norm_ba", "coef_before", "coef_after", "jump")
GROUP_OF = {"q_proj": "q", "query": "q", "v_proj": "v", "value": "v"}


def projection_group(name: str) -> str:
    """'q' / 'v' for the query / value projections (transformers 4.x and 5.x names), else the attribute name."""
    last = name.rsplit(".", 1)[-1]
    return GROUP_OF.get(last, last)


def _stats(values: list) -> dict:
    vals = [float(v) for v in values]
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}


def summarize_adapters(boundary: dict) -> dict:
    """{group: {metric: {min, median, max}}} over the adapted projections of one boundary record."""
    groups: dict = {}
    for layer in boundary["layers"]:
        groups.setdefault(projection_group(layer["name"]), []).append(layer)
    return {g: {m: _stats([layer[m] for layer in layers]) for m in METRICS} for g, layers in sorted(groups.items())}


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """||after - before||_F / ||before||_F over the whole probe batch (B, d)."""
    before, after = before.double(), after.double()
    return float((after - before).norm() / before.norm().clamp_min(1e-300))


class BoundaryRecorder:
    """Collects one record per task boundary; the trainer feeds it at the three points of a task."""

    def __init__(self):
        self.records: list = []  # one dict per boundary i -> i + 1, i = 0, 1, ...
        self.end_features: Optional[torch.Tensor] = None  # probe features at the end of the last finished task

    def _record(self, task: int) -> dict:
        """The record of boundary task -> task + 1 (created on first use)."""
        while len(self.records) <= task:
            self.records.append({"task": len(self.records)})
        return self.records[task]

    def adapters(self, boundary: Optional[dict]) -> Optional[dict]:
        """Store the model's boundary record (None for methods without frozen directions)."""
        if boundary is None:
            return None
        rec = self._record(boundary["task"])
        rec["m_end"] = boundary["m_end"]
        rec["adapters"] = summarize_adapters(boundary)
        rec["layers"] = boundary["layers"]
        return rec

    def task_start(self, task: int, features: Optional[torch.Tensor]) -> Optional[float]:
        """Probe features just after the boundary into `task` (before any step of it)."""
        if task == 0 or features is None or self.end_features is None:
            return None
        rec = self._record(task - 1)
        rec["feature_change_at_boundary"] = relative_change(self.end_features, features)
        return rec["feature_change_at_boundary"]

    def task_end(self, task: int, features: Optional[torch.Tensor]) -> Optional[float]:
        """Probe features at the end of `task`: closes boundary task-1 -> task, opens task -> task+1."""
        if features is None:
            return None
        change = None
        if task >= 1 and self.end_features is not None:
            rec = self._record(task - 1)
            rec["feature_change_after_next_task"] = change = relative_change(self.end_features, features)
        self.end_features = features.detach().double().cpu()
        return change

    # -------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        f = self.end_features
        return {"records": self.records,
                "end_features": None if f is None else {"shape": list(f.shape), "values": f.flatten().tolist()}}

    def load_state_dict(self, sd: dict) -> None:
        self.records = sd.get("records", [])
        f = sd.get("end_features")
        self.end_features = None if f is None else torch.tensor(f["values"], dtype=torch.float64).reshape(f["shape"])


def _record_lines(rec: dict) -> list:
    """The lines of one boundary record; a long m_end shows its first and last metrics.EDGE values."""
    lines = []
    head = f"boundary {rec['task']} -> {rec['task'] + 1}"
    fb, fn = rec.get("feature_change_at_boundary"), rec.get("feature_change_after_next_task")
    feats = []
    if fb is not None:
        feats.append(f"CLS feature change at the boundary {fb:.4f}")
    if fn is not None:
        feats.append(f"after the next task {fn:.4f}")
    lines.append(head + (": " + ", ".join(feats) if feats else ""))
    if "m_end" in rec:
        m_end = ends([f"{v:.4f}" for v in rec["m_end"]])
        lines.append("  magnitudes (m + k) at the end of the task: " + ", ".join(m_end))
    for g, metrics in rec.get("adapters", {}).items():
        parts = []
        for m in METRICS:
            st = metrics[m]
            parts.append(f"{m} {_fmt(st['min'])}/{_fmt(st['median'])}/{_fmt(st['max'])}")
        lines.append(f"  {g} (min/median/max over blocks): " + " | ".join(parts))
    return lines


def _summary_lines(records: list) -> list:
    """Over all boundaries: the feature changes and each adapter metric as min/median/max."""
    lines = [f"{len(records)} boundaries (each in results.json 'boundaries'); over all of them, min/median/max:"]
    for key, what in (("feature_change_at_boundary", "CLS feature change at the boundary"),
                      ("feature_change_after_next_task", "after the next task")):
        values = [(r[key], r["task"]) for r in records if r.get(key) is not None]
        if values:
            worst = max(values)
            st = _stats([v for v, _ in values])
            lines.append(f"  {what}: {st['min']:.4f}/{st['median']:.4f}/{st['max']:.4f} "
                         f"(max at boundary {worst[1]} -> {worst[1] + 1})")
    groups = sorted({g for r in records for g in r.get("adapters", {})})
    for g in groups:
        parts = []
        for m in METRICS:
            per = [r["adapters"][g][m] for r in records if g in r.get("adapters", {})]
            parts.append(f"{m} {_fmt(min(p['min'] for p in per))}/"
                         f"{_fmt(statistics.median(p['median'] for p in per))}/{_fmt(max(p['max'] for p in per))}")
        lines.append(f"  {g}: " + " | ".join(parts))
    return lines


def format_boundaries(records: list) -> str:
    """A plain-text table of the boundary records (sdlora-diagnose). Above CELL_TEXT_MAX_TASKS
    boundaries it stays one screen: a summary over all boundaries, then the first and last two
    in full (every record is in results.json)."""
    if len(records) <= CELL_TEXT_MAX_TASKS:
        return "\n".join(line for rec in records for line in _record_lines(rec))
    lines = _summary_lines(records)
    for rec in records[:2] + [None] + records[-2:]:
        lines += ["..."] if rec is None else _record_lines(rec)
    return "\n".join(lines)


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "inf"
    return f"{v:.4g}"
