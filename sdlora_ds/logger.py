"""One small metrics logger: rank 0 writes TensorBoard events and metrics.jsonl; other ranks no-op."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np


class MetricLogger:
    """resume=(step, jsonl_bytes) continues a resumed run's logs from a checkpoint: TensorBoard hides
    the events of steps > step written before (purge_step) and metrics.jsonl is cut back to the
    jsonl_bytes it held when the checkpoint was taken, so nothing is logged twice."""

    def __init__(self, run_dir: str, enabled: bool, resume: Optional[tuple] = None):
        self.enabled = enabled
        self.writer = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb_dir = os.path.join(run_dir, "tensorboard")
            self.writer = SummaryWriter(self.tb_dir, purge_step=None if resume is None else resume[0] + 1)
            path = os.path.join(run_dir, "metrics.jsonl")
            if resume is not None and os.path.exists(path):
                with open(path, "r+b") as f:
                    f.truncate(min(resume[1], os.path.getsize(path)))
            self._jsonl = open(path, "a", buffering=1)

    def jsonl_bytes(self) -> int:
        """Current length of metrics.jsonl (recorded in checkpoints; lines are flushed as written)."""
        return self._jsonl.tell() if self.enabled else 0

    def scalar(self, tag: str, value: float, step: int) -> None:
        if not self.enabled:
            return
        self.writer.add_scalar(tag, value, step)
        self._jsonl.write(json.dumps({"tag": tag, "value": float(value), "step": int(step)}) + "\n")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def acc_matrix(self, acc: list, step: int) -> None:
        """The accuracy matrix as an image (rows: after task t, columns: task j)."""
        if self.enabled:
            self.writer.add_image("eval/acc_matrix", render_matrix(acc), step, dataformats="HWC")

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.enabled:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self._jsonl.close()
            self.enabled = False


def render_matrix(acc: list, cell: int = 48) -> np.ndarray:
    """(H, W, 3) uint8 heat map of acc[t][j] in [0, 100] with the value written in each cell."""
    from PIL import Image, ImageDraw
    T = len(acc)
    img = Image.new("RGB", (cell * T, cell * T), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for t, row in enumerate(acc):
        for j, v in enumerate(row):
            g = int(255 * max(0.0, min(1.0, v / 100.0)))
            box = (j * cell, t * cell, (j + 1) * cell - 1, (t + 1) * cell - 1)
            draw.rectangle(box, fill=(255 - g, 80 + g * 175 // 255, 255 - g))
            draw.text((j * cell + 4, t * cell + cell // 3), f"{v:.1f}", fill=(0, 0, 0))
    return np.asarray(img)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_scalars(tb_dir: str) -> dict:
    """{tag: [(step, value)]} read back with tensorboard's own event reader (tests, tools)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_image_tags(tb_dir: str) -> Optional[list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir, size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]
