"""TrainState and RunShape: the run's position and shape, through JSON and back, old checkpoints included."""
import json

import torch

from sdlora_ds.train_state import RunShape, TrainState

SHAPE = RunShape(world_size=2, micro_batch=4, grad_accum=3, deepspeed=True, zero_stage=2, mixed_precision="bf16",
                 threads=5)


def test_run_shape_round_trip_and_field_order():
    d = SHAPE.to_dict()
    assert list(d) == ["world_size", "micro_batch", "grad_accum", "deepspeed", "zero_stage", "mixed_precision",
                       "threads"]  # the order results.json's topologies are written in
    assert RunShape.from_dict(json.loads(json.dumps(d))) == SHAPE
    # records from before `deepspeed` and `threads`: derived from the stage, unknown
    old = {k: v for k, v in d.items() if k not in ("deepspeed", "threads")}
    assert RunShape.from_dict(old) == RunShape(2, 4, 3, True, 2, "bf16", None)
    assert RunShape.from_dict({**old, "zero_stage": None}).deepspeed is False


def test_run_shape_of_launch_reads_the_accelerator_and_threads():
    class Acc:
        num_processes, mixed_precision = 3, "no"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        shape = RunShape.of_launch(Acc(), 8, 2, False, None)
    finally:
        torch.set_num_threads(before)
    assert shape == RunShape(3, 8, 2, False, None, "no", 1)


def test_train_state_steps_tasks_and_segments():
    s = TrainState()
    s.begin_segment(SHAPE)
    s.step_done(0.5)
    s.step_done(0.25)
    s.position = (0, 1, 0)
    s.task_elapsed = 3.0
    s.task_done(0, 7.5)
    assert (s.position, s.global_step, s.loss_log, s.task_times, s.task_elapsed) == \
        ((1, 0, 0), 2, [(1, 0.5), (2, 0.25)], [7.5], 0.0)
    later = RunShape(1, 8, 3, False, None, "bf16", 2)
    s.begin_segment(later)
    assert s.last_shape() == later
    assert [t["from_global_step"] for t in s.topologies] == [0, 2]
    assert s.topologies[1]["from_position"] == [1, 0, 0]


def test_train_state_round_trips_through_json():
    s = TrainState()
    s.begin_segment(SHAPE)
    s.step_done(1.0)
    s.position = (0, 0, 1)
    s.acc_matrix, s.acc_all = [[90.0]], [90.0]
    s.magnitude_log.append((1, [1.0, 0.5]))
    back = TrainState()
    back.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert back == s  # tuples come back as tuples (loss_log, magnitude_log, position)


def test_train_state_reads_a_checkpoint_from_before_the_segment_history():
    """trainer.json then held one shape at its top level: it becomes the first segment."""
    old = {"position": {"task": 1, "epoch": 0, "step": 0}, "global_step": 6, "acc_matrix": [[80.0]],
           "acc_all": [80.0], "loss_log": [[1, 0.9]], "task_times": [1.0], "task_elapsed": 0.0,
           "world_size": 1, "micro_batch": 8, "grad_accum": 2, "mixed_precision": "no", "zero_stage": None}
    s = TrainState()
    s.load_state_dict(old)
    assert s.position == (1, 0, 0) and s.magnitude_log == [] and len(s.topologies) == 1
    assert s.last_shape() == RunShape(1, 8, 2, False, None, "no", None)
    assert s.topologies[0]["from_global_step"] == 0
