"""One small metrics logger: rank 0 writes TensorBoard events and metrics.jsonl; other ranks no-op.

Logs that stay true across resumes. Every logged point (a scalar, the accuracy-matrix image, a
text, the hparams summaries) is one TensorBoard event, and the logger counts them; a checkpoint
records `position()` = (events logged so far, bytes of metrics.jsonl). A resumed run puts both
files back to that position before it logs anything:

  * metrics.jsonl is cut back to the recorded length;
  * tensorboard/ is rebuilt: the first `tb_events` events of its files (read in the order
    TensorBoard reads them, sorted by name) are copied byte for byte into ONE new event file and
    every older file is dropped. TensorBoard's own `purge_step` cannot do this: it discards
    events by step, for every tag at once, and the run logs on two step axes (optimizer steps for
    train/*, task index for eval/* and the matrix image), so a re-evaluated task or a re-run
    finish would be logged twice at a step <= the purge step.

The swap of the rebuilt folder is crash-safe: the new folder is written completely beside the old
one, then `tensorboard -> tensorboard.old`, `tensorboard.new -> tensorboard`; a run killed between
the two renames is repaired by the next start. A fresh start (no checkpoint) is position (0, 0):
the logs of an earlier attempt in the folder are removed, never appended to. TensorBoard read back
with EventAccumulator therefore equals an uninterrupted run's, point for point.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import numpy as np

from .metrics import CELL_TEXT_MAX_TASKS, task_ticks

TB_DIR = "tensorboard"
JSONL = "metrics.jsonl"
# The rebuilt file's name sorts before every file a SummaryWriter creates (which start with the
# 10-digit time): TensorBoard reads a folder's files in name order.
REBUILT = "events.out.tfevents.0000000000.rebuilt"


class MetricLogger:
    """resume: None (a fresh run: earlier logs in run_dir are removed) or a checkpoint's
    `position()` dict {"tb_events": n, "jsonl_bytes": b}: the logs are put back to it (see module
    docstring). `notes` says what was done (for the trainer to print)."""

    def __init__(self, run_dir: str, enabled: bool, resume: Optional[dict] = None):
        self.enabled = enabled
        self.writer = None
        self._jsonl = None
        self.events = 0  # TensorBoard events logged by this run (all sessions)
        self.notes: list = []
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        self.tb_dir = os.path.join(run_dir, TB_DIR)
        path = os.path.join(run_dir, JSONL)
        keep_events = 0 if resume is None else resume.get("tb_events")
        keep_bytes = 0 if resume is None else resume.get("jsonl_bytes", 0)
        self.events = restore_tensorboard(self.tb_dir, keep_events, self.notes)
        if os.path.exists(path):
            size = os.path.getsize(path)
            if size < keep_bytes:
                self.notes.append(f"note: {path} holds {size} of the {keep_bytes} bytes logged before the "
                                  f"checkpoint (logs of another folder?); it continues from what is there")
            elif size > keep_bytes and resume is None:
                self.notes.append(f"note: fresh start: removed {path} of an earlier attempt")
            with open(path, "r+b") as f:
                f.truncate(min(keep_bytes, size))
        self.writer = SummaryWriter(self.tb_dir)
        self._jsonl = open(path, "a", buffering=1)

    def position(self) -> dict:
        """Where the logs stand (recorded in checkpoints; call flush() first: rank 0 only)."""
        return {"tb_events": self.events, "jsonl_bytes": self._jsonl.tell() if self.enabled else 0}

    def scalar(self, tag: str, value: float, step: int) -> None:
        if not self.enabled:
            return
        self.writer.add_scalar(tag, value, step)
        self.events += 1
        self._jsonl.write(json.dumps({"tag": tag, "value": float(value), "step": int(step)}) + "\n")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)
            self.events += 1

    def acc_matrix(self, acc: list, acc_all: list, step: int) -> None:
        """The accuracy matrix so far as an image (render_matrix), at step = the task just evaluated."""
        if self.enabled:
            self.writer.add_image("eval/acc_matrix", render_matrix(acc, acc_all), step, dataformats="HWC")
            self.events += 1

    def hparams(self, hparams: dict, metrics: dict, step: int) -> None:
        """The run's hparams (hparams plugin) and its headline metrics, in the run's own event file
        (SummaryWriter.add_hparams would open a second writer and file for them)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        tagged = {f"hparam/{k}": v for k, v in metrics.items()}
        for summary in hparams_summaries(clean, tagged):  # experiment, session start, session end
            self.writer.file_writer.add_summary(summary, step)
            self.events += 1
        for tag, value in tagged.items():
            self.writer.add_scalar(tag, value, step)
            self.events += 1

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self._jsonl.close()
            self.enabled = False


# ---------------------------------------------------------------------- resuming the event files
def event_files(tb_dir: str) -> list:
    """The folder's event files in the order TensorBoard reads them (sorted by name)."""
    if not os.path.isdir(tb_dir):
        return []
    return [os.path.join(tb_dir, n) for n in sorted(os.listdir(tb_dir)) if "tfevents" in n]


def raw_events(tb_dir: str) -> list:
    """(serialized event, is_header) of every event in the folder, in reading order; a record cut
    short by a kill ends its file (TensorBoard's own reader does the same)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    out = []
    for path in event_files(tb_dir):
        for data in RawEventFileLoader(path).Load():
            ev = event_pb2.Event.FromString(data)
            out.append((data, ev.WhichOneof("what") == "file_version"))
    return out


def _repair_swap(tb_dir: str) -> None:
    """Finish or undo a swap interrupted by a kill (see the module docstring)."""
    new, old = tb_dir + ".new", tb_dir + ".old"
    if not os.path.exists(tb_dir):
        if os.path.isdir(new):  # killed between the two renames: .new was complete
            os.rename(new, tb_dir)
        elif os.path.isdir(old):
            os.rename(old, tb_dir)
    shutil.rmtree(new, ignore_errors=True)  # a rebuild that never got to the swap
    shutil.rmtree(old, ignore_errors=True)


def restore_tensorboard(tb_dir: str, keep: Optional[int], notes: list) -> int:
    """Put tb_dir back to its first `keep` events (0: empty; None: a checkpoint from before event
    counting: left as it is). Returns the number of events kept."""
    _repair_swap(tb_dir)
    events = raw_events(tb_dir)
    points = [data for data, header in events if not header]
    if keep is None:
        notes.append(f"note: the checkpoint does not record its TensorBoard position; {tb_dir} is continued as it is")
        return len(points)
    if keep == 0:
        if points or event_files(tb_dir):
            notes.append(f"note: fresh start: removed {len(points)} TensorBoard event(s) of an earlier attempt "
                         f"in {tb_dir}")
            shutil.rmtree(tb_dir)
        return 0
    if len(points) < keep:
        notes.append(f"note: {tb_dir} holds {len(points)} of the {keep} events logged before the checkpoint "
                     f"(logs of another folder?); it continues from what is there")
        if not points:
            return 0
    files = event_files(tb_dir)
    if len(points) == keep and len(files) == 1 and os.path.basename(files[0]) == REBUILT:
        return keep  # already exactly the checkpoint's logs
    new = tb_dir + ".new"
    os.makedirs(new)
    from tensorboard.summary.writer.record_writer import RecordWriter
    with open(os.path.join(new, REBUILT), "wb") as f:
        writer = RecordWriter(f)
        headers = [data for data, header in events if header]
        if headers:
            writer.write(headers[0])
        for data in points[:keep]:
            writer.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tb_dir, tb_dir + ".old")
    os.rename(new, tb_dir)
    shutil.rmtree(tb_dir + ".old")
    return min(keep, len(points))


# ---------------------------------------------------------------------- the matrix image
def render_matrix(acc: list, acc_all: Optional[list] = None, dpi: int = 100) -> np.ndarray:
    """(H, W, 3) uint8 image of the accuracy matrix acc[t][j] (percent): rows 'after task t',
    columns 'task j', then an 'all seen' column (acc_all[t]), each cell with its value (above
    metrics.CELL_TEXT_MAX_TASKS tasks: a fixed-size heat map, no cell text, ~10 task ticks), a
    red-to-green colour map fixed to 0-100 % (low is red: forgetting stands out) and a colour bar.
    Rendered by matplotlib's Agg canvas (no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    T = len(acc)
    cell_text = T <= CELL_TEXT_MAX_TASKS
    # the all-seen column: one cell wide with cell text, ~5 % of the width on a heat map (visible)
    all_w = 0 if acc_all is None else 1 if cell_text else max(1, round(T / 20))
    cols = T + all_w
    grid = np.full((T, cols), np.nan)
    for t, row in enumerate(acc):
        grid[t, :len(row)] = row
        if acc_all is not None:
            grid[t, T:] = acc_all[t]
    if cell_text:
        size = 1.6 + 0.62 * max(cols, 2)
        fig = Figure(figsize=(size + 1.2, 1.3 + 0.5 * max(T, 2)), dpi=dpi)
    else:  # a heat map of fixed size: the per-cell figure would be ~12600 x 10000 px at T = 200
        fig = Figure(figsize=(10.0, 8.0), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0.0, vmax=100.0, aspect="auto")
    fontsize = 10 if cols <= 12 else 8
    if cell_text:
        for t in range(T):
            for j in range(cols):
                if not np.isnan(grid[t, j]):
                    ax.text(j, t, f"{grid[t, j]:.1f}", ha="center", va="center", fontsize=fontsize, color="black")
        labels = [f"task {j}" for j in range(T)] + (["all seen"] if acc_all is not None else [])
        ax.set_xticks(range(cols), labels, rotation=45 if cols > 6 else 0, ha="right" if cols > 6 else "center",
                      fontsize=fontsize)
        ax.set_yticks(range(T), [f"after task {t}" for t in range(T)], fontsize=fontsize)
    else:
        ticks = task_ticks(T)
        ax.set_xticks(ticks + ([T + (all_w - 1) / 2] if acc_all is not None else []),
                      [str(j) for j in ticks] + (["all"] if acc_all is not None else []), fontsize=fontsize)
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=fontsize)
        ax.set_xlabel("task evaluated", fontsize=fontsize)
        ax.set_ylabel("after task", fontsize=fontsize)
    if acc_all is not None:
        ax.axvline(T - 0.5, color="black", linewidth=2)  # the all-seen column is not one task
    ax.set_title(f"accuracy (%) after each task ({T} task{'s' if T != 1 else ''})", fontsize=fontsize + 1)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03).set_label("accuracy (%)", fontsize=fontsize)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()


# ---------------------------------------------------------------------- helpers
def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _accumulator(tb_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def read_scalars(tb_dir: str) -> dict:
    """{tag: [(step, value)]} read back with tensorboard's own event reader (tests, tools)."""
    acc = _accumulator(tb_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_image_tags(tb_dir: str) -> Optional[list]:
    return _accumulator(tb_dir).Tags()["images"]


def read_back(tb_dir: str) -> dict:
    """Everything EventAccumulator reads back, without wall times: {'scalars': {tag: [(step,
    value)]}, 'images': {tag: [(step, w, h, png bytes)]}, 'tensors': {tag: [(step, bytes)]}} plus
    'tags': every summary tag in file order with its step (hparams summaries included): for
    comparing two runs' logs point for point."""
    from tensorboard.compat.proto import event_pb2
    acc = _accumulator(tb_dir)
    tags = acc.Tags()
    out = {"scalars": {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]},
           "images": {t: [(e.step, e.width, e.height, e.encoded_image_string) for e in acc.Images(t)]
                      for t in tags["images"]},
           "tensors": {t: [(e.step, e.tensor_proto.SerializeToString()) for e in acc.Tensors(t)]
                       for t in tags["tensors"]}}
    out["tags"] = [(v.tag, ev.step) for data, header in raw_events(tb_dir) if not header
                   for ev in [event_pb2.Event.FromString(data)] for v in ev.summary.value]
    return out
