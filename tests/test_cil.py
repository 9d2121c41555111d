import numpy as np
import torch

from sdlora_ds.cil import TaskSchedule, class_order
from sdlora_ds.config import CILConfig


def test_class_order_reproduces_published_seed_1993_order():
    # The CIFAR-100 order printed by PyCIL-style code for seed 1993 starts like this.
    order = class_order(CILConfig(num_classes=100, init_classes=10, increment=10, num_tasks=10, order_seed=1993))
    assert order[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert sorted(order) == list(range(100))


def test_class_order_does_not_touch_global_numpy_state():
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    class_order(CILConfig(num_classes=200, init_classes=40, increment=40, num_tasks=5))
    assert np.random.rand() == expected


def test_explicit_order_and_schedule():
    cfg = CILConfig(num_classes=6, init_classes=2, increment=2, num_tasks=3, class_order=[5, 4, 3, 2, 1, 0])
    s = TaskSchedule.from_config(cfg)
    assert s.classes(0) == [5, 4] and s.classes(2) == [1, 0] and s.seen_classes(1) == [5, 4, 3, 2]
    assert s.name() == "B2-2-3"
    lut = s.position_lookup(6)
    assert lut[torch.tensor([5, 0, 3])].tolist() == [0, 5, 2]
    assert s.task_of_position().tolist() == [0, 0, 1, 1, 2, 2]


def test_uneven_first_task():
    s = TaskSchedule(list(range(10)), init_classes=4, increment=3, num_tasks=3)
    assert [s.size(t) for t in range(3)] == [4, 3, 3] and s.start(2) == 7 and s.end(2) == 10
