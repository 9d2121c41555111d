"""Where a run stands, in one stateful object (torchtitan's TrainState pattern).

    RunShape    how one launch runs the loop: world size, micro-batch, accumulation, DeepSpeed and
                ZeRO stage, precision, intra-op threads. Defined here only; trainer.json,
                results.json and the checkpoint manifests read it.
    TrainState  position (task, epoch, step in epoch) of the next optimizer step, global step,
                accuracy rows, losses, task times, magnitude trajectory and one topology per launch
                segment (RunShape + where the segment began), with state_dict/load_state_dict.

Both are plain data: nothing here touches torch's state, the model or the files (TrainState is one
of the checkpoint's registered parts: checkpoint_parts.py saves and loads it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class RunShape:
    """How one launch runs the loop. The field order is the order written to JSON."""
    world_size: int
    micro_batch: int
    grad_accum: int
    deepspeed: bool
    zero_stage: Optional[int]
    mixed_precision: str
    threads: Optional[int]  # intra-op threads per process; None in checkpoints from before they were recorded

    @classmethod
    def of_launch(cls, accelerator, micro_batch: int, grad_accum: int, deepspeed: bool,
                  zero_stage: Optional[int]) -> "RunShape":
        """This launch's shape, with the thread count in force now (after a resume chose it)."""
        return cls(world_size=accelerator.num_processes, micro_batch=micro_batch, grad_accum=grad_accum,
                   deepspeed=deepspeed, zero_stage=zero_stage, mixed_precision=str(accelerator.mixed_precision),
                   threads=torch.get_num_threads())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunShape":
        """Tolerates records from before `deepspeed` (derived from the stage) and `threads` existed."""
        return cls(world_size=d["world_size"], micro_batch=d["micro_batch"], grad_accum=d["grad_accum"],
                   deepspeed=d.get("deepspeed", d["zero_stage"] is not None), zero_stage=d["zero_stage"],
                   mixed_precision=d["mixed_precision"], threads=d.get("threads"))


@dataclass
class TrainState:
    """The loop's position and what it has measured so far (JSON-able through state_dict)."""
    position: tuple = (0, 0, 0)  # (task, epoch, optimizer step within the epoch) of the next step
    global_step: int = 0
    acc_matrix: list = field(default_factory=list)  # acc[t][j]: accuracy (%) on task j's classes after task t
    acc_all: list = field(default_factory=list)  # accuracy (%) on every class seen after task t
    loss_log: list = field(default_factory=list)  # (global step, loss) of every optimizer step
    task_times: list = field(default_factory=list)  # seconds per finished task
    task_elapsed: float = 0.0  # seconds spent in the current task before a resume
    magnitude_log: list = field(default_factory=list)  # (global step, [m + k per task]) every log_every steps
    topologies: list = field(default_factory=list)  # one per launch segment: begin_segment()

    @property
    def task(self) -> int:
        return self.position[0]

    def begin_segment(self, shape: RunShape) -> None:
        """A launch starts (or resumes) the loop here with `shape`."""
        self.topologies.append({"from_global_step": self.global_step, "from_position": list(self.position),
                                **shape.to_dict()})

    def last_shape(self) -> RunShape:
        """The shape of the latest launch segment (the one that wrote a checkpoint being read)."""
        assert self.topologies, "no launch segment recorded"
        return RunShape.from_dict(self.topologies[-1])

    def step_done(self, loss: float) -> None:
        """An optimizer step was taken."""
        self.global_step += 1
        self.loss_log.append((self.global_step, loss))

    def task_done(self, t: int, seconds: float) -> None:
        """Task t is trained and evaluated: the next position is task t + 1's start."""
        self.task_times.append(seconds)
        self.position, self.task_elapsed = (t + 1, 0, 0), 0.0

    def state_dict(self) -> dict:
        task, epoch, step = self.position
        return {"position": {"task": task, "epoch": epoch, "step": step}, "global_step": self.global_step,
                "acc_matrix": self.acc_matrix, "acc_all": self.acc_all, "loss_log": self.loss_log,
                "task_times": self.task_times, "task_elapsed": self.task_elapsed, "topologies": self.topologies,
                "magnitude_log": self.magnitude_log}

    def load_state_dict(self, sd: dict) -> None:
        """Reads every trainer.json this project has written: before the segment history a
        checkpoint held one shape at its top level, which becomes the first segment."""
        p = sd["position"]
        self.position = (p["task"], p["epoch"], p["step"])
        self.global_step = sd["global_step"]
        self.acc_matrix, self.acc_all = sd["acc_matrix"], sd["acc_all"]
        self.loss_log = [tuple(x) for x in sd["loss_log"]]
        self.task_times, self.task_elapsed = sd["task_times"], sd["task_elapsed"]
        self.magnitude_log = [tuple(x) for x in sd.get("magnitude_log", [])]
        self.topologies = sd.get("topologies") or [
            {"from_global_step": 0, "from_position": [0, 0, 0], **RunShape.from_dict(sd).to_dict()}]
