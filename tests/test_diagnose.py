"""Task-aware vs task-agnostic accuracy of a finished run (sdlora_ds/diagnose.py)."""
import json
import os

import pytest
import torch

from conftest import tiny_config_dict
from sdlora_ds.cil import TaskSchedule
from sdlora_ds.diagnose import diagnose_run, error_split, format_diagnosis, summarize


def test_error_split_by_hand():
    sched = TaskSchedule(order=[0, 1, 2, 3], init_classes=2, increment=2, num_tasks=2)
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0],   # true 0 (task 0): right
                           [0.0, 1.0, 9.0, 0.0],   # true 1 (task 0): predicted 2 -> into newer; aware: 1 right
                           [3.0, 0.0, 1.0, 2.0],   # true 2 (task 1): predicted 0 -> into older; aware: 3 wrong
                           [0.0, 0.0, 1.0, 2.0]])  # true 3 (task 1): right
    c = error_split(logits, torch.tensor([0, 1, 2, 3]), sched)
    assert c["count"].tolist() == [2, 2]
    assert c["agnostic"].tolist() == [1, 1] and c["aware"].tolist() == [2, 1]
    assert c["into_older"].tolist() == [0, 1] and c["into_newer"].tolist() == [1, 0]
    s = summarize(c)
    assert s["agnostic_all"] == 50.0 and s["aware_all"] == 75.0 and s["aware"] == [100.0, 50.0]
    assert "T1" in format_diagnosis(s)


def test_diagnose_run_agrees_with_the_runs_own_evaluation(tmp_path):
    from transformers import ViTModel
    from sdlora_ds.config import BackboneConfig, config_from_dict
    from sdlora_ds.model.backbone import vit_config
    from sdlora_ds.trainer import Trainer
    from shards.digits import write_digits_shards
    index = write_digits_shards(str(tmp_path / "shards"))
    torch.manual_seed(0)
    arch = tiny_config_dict()["backbone"]
    ViTModel(vit_config(BackboneConfig(**arch)), add_pooling_layer=False).save_pretrained(str(tmp_path / "bb"))
    raw = tiny_config_dict(index=index, name="diag", output_dir=str(tmp_path / "runs"),
                           backbone={"source": "pretrained", "path": str(tmp_path / "bb")},
                           cil={"num_classes": 10, "init_classes": 4, "increment": 3, "num_tasks": 3},
                           optim={"epochs": 1, "global_batch": 16, "lr": 0.05, "max_steps_per_epoch": 3})
    Trainer(config_from_dict(raw)).run()
    run_dir = str(tmp_path / "runs" / "diag")
    d = diagnose_run(run_dir)
    results = json.load(open(os.path.join(run_dir, "results.json")))
    # the agnostic numbers are the run's own last row, recomputed from the saved final model
    assert d["agnostic_all"] == pytest.approx(results["last_acc"], abs=1e-9)
    assert d["agnostic"] == pytest.approx(results["acc_matrix"][-1], abs=1e-9)
    for j in range(3):  # an oracle task id can only help; every agnostic error is inside or across tasks
        assert d["aware"][j] >= d["agnostic"][j] - 1e-9
        assert d["agnostic"][j] + d["into_older"][j] + d["into_newer"][j] <= 100.0 + 1e-9
    assert d["into_older"][0] == 0.0 and d["into_newer"][2] == 0.0
