"""Class-incremental protocol: class order, task schedule, label mapping.

Every rank derives the same order and schedule from the config alone (no communication).
Labels inside the model are positions in the class order: head row j scores class_order[j].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import CILConfig


def class_order(cfg: CILConfig) -> list:
    """The explicit order, or np.random.seed(order_seed); np.random.permutation(num_classes) — the
    recipe that reproduces the class orders printed in the authors' logs (seeds 1993-1995)."""
    if cfg.class_order is not None:
        return [int(c) for c in cfg.class_order]
    state = np.random.get_state()  # do not disturb anyone else's global numpy stream
    try:
        np.random.seed(cfg.order_seed)
        return [int(c) for c in np.random.permutation(cfg.num_classes)]
    finally:
        np.random.set_state(state)


@dataclass
class TaskSchedule:
    """B{init}-{inc}-{tasks}: task t owns order positions [start(t), end(t))."""
    order: list
    init_classes: int
    increment: int
    num_tasks: int

    @classmethod
    def from_config(cls, cfg: CILConfig) -> "TaskSchedule":
        return cls(class_order(cfg), cfg.init_classes, cfg.increment, cfg.num_tasks)

    def start(self, t: int) -> int:
        return 0 if t == 0 else self.init_classes + (t - 1) * self.increment

    def end(self, t: int) -> int:
        return self.init_classes + t * self.increment

    def size(self, t: int) -> int:
        return self.end(t) - self.start(t)

    def classes(self, t: int) -> list:
        """Original class ids (of the shard index) of task t."""
        return self.order[self.start(t):self.end(t)]

    def seen_classes(self, t: int) -> list:
        return self.order[:self.end(t)]

    def position_lookup(self, num_classes: int) -> torch.Tensor:
        """(num_classes,) original class id -> position in the order (what the head predicts)."""
        lut = torch.empty(num_classes, dtype=torch.long)
        lut[torch.tensor(self.order)] = torch.arange(len(self.order))
        return lut

    def task_of_position(self) -> torch.Tensor:
        """(num_classes,) position -> task id, to split accuracy by task."""
        return torch.tensor([t for t in range(self.num_tasks) for _ in range(self.size(t))])

    def name(self) -> str:
        return f"B{self.init_classes}-{self.increment}-{self.num_tasks}"
