import glob
import json
import os

import pytest

from conftest import ROOT, tiny_config_dict
from sdlora_ds.config import ConfigError, RunConfig, config_from_dict, config_to_dict, load_config
from sdlora_ds.fileio import atomic_write_json

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))


def test_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"demo_digits.json", "cifar100_b10.json", "imagenetr_b10.json", "imagenetr_b20.json",
            "imagenetr_b40.json"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    c = cfg.cil
    assert c.init_classes + (c.num_tasks - 1) * c.increment == c.num_classes
    micro, accum = cfg.optim.batch_plan(1)
    assert micro * accum == cfg.optim.global_batch


def test_seed_recipes_match_the_spec():
    r = {os.path.basename(p)[:-5]: load_config(p) for p in CONFIGS}
    for name, (n, init, tasks, lr) in {"imagenetr_b40": (200, 40, 5, 1e-2), "imagenetr_b20": (200, 20, 10, 1e-2),
                                       "imagenetr_b10": (200, 10, 20, 1e-2), "cifar100_b10": (100, 10, 10, 8e-3)}.items():
        c = r[name]
        assert (c.cil.num_classes, c.cil.init_classes, c.cil.num_tasks, c.optim.lr) == (n, init, tasks, lr)
        assert (c.optim.epochs, c.optim.global_batch, c.optim.momentum, c.adapter.rank) == (20, 128, 0.9, 10)
        assert c.data.train_scale == [0.05, 1.0] and c.data.mean is None
    assert r["imagenetr_b40"].data.test_resize == 256 and r["cifar100_b10"].data.test_resize == 224


BROKEN = [
    ({"cil": {"num_tasks": 4}}, "cil.num_tasks"),
    ({"optim": {"lr": -1.0}}, "optim.lr"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"optim": {"epochs": 2.5}}, "optim.epochs"),
    ({"adapter": {"rnak": 4}}, "adapter.rnak"),
    ({"bogus": 1}, "bogus"),
    ({"adapter": {"norm": "l2"}}, "adapter.norm"),
    ({"adapter": {"rank_schedule": [[1, 10]]}}, "adapter.rank_schedule"),
    ({"adapter": {"rank": 64}}, "adapter.rank"),  # wider than the tiny backbone (limits.py)
    ({"adapter": {"kd": {"threshold": -1.0}}}, "adapter.kd.threshold"),
    ({"data": {"index": ""}}, "data.index"),
    ({"data": {"mean": [0.5, 0.5, 0.5]}}, "data.std"),
    ({"data": {"image_size": 64, "test_resize": 64}}, "data.image_size"),
    ({"backbone": {"num_heads": 5}}, "backbone.num_heads"),
    ({"backbone": {"source": "pretrained", "path": None}}, "backbone.path"),
    ({"cil": {"class_order": [0, 1, 2]}}, "cil.class_order"),
    ({"dist": {"mixed_precision": "fp8"}}, "dist.mixed_precision"),
    ({"hflip": True}, "hflip"),
    ({"adapter": {"freeze": "smooth"}}, "adapter.freeze"),
    ({"method": "seq_lora", "adapter": {"freeze": "continuous"}}, "adapter.freeze"),
    ({"train": {"probe_size": -1}}, "train.probe_size"),
    ({"method": "nearest"}, "method"),
]


@pytest.mark.parametrize("over,field", BROKEN, ids=[f for _, f in BROKEN])
def test_broken_configs_name_their_field(over, field):
    with pytest.raises(ConfigError) as e:
        config_from_dict(tiny_config_dict(**over))
    assert f"'{field}'" in str(e.value)


def test_batch_plan_refuses_impossible_splits():
    cfg = config_from_dict(tiny_config_dict(optim={"global_batch": 16}))
    assert cfg.optim.batch_plan(2) == (8, 1)
    assert cfg.optim.batch_plan(4) == (4, 1)
    with pytest.raises(ConfigError, match="global_batch"):
        cfg.optim.batch_plan(3)
    cfg = config_from_dict(tiny_config_dict(optim={"global_batch": 16, "micro_batch": 4}))
    assert cfg.optim.batch_plan(2) == (4, 2)
    cfg = config_from_dict(tiny_config_dict(optim={"global_batch": 16, "micro_batch": 4, "grad_accum": 3}))
    with pytest.raises(ConfigError, match=r"micro_batch \(4\) x grad_accum \(3\) x world size \(2\)"):
        cfg.optim.batch_plan(2)


def test_overrides_and_dump_roundtrip(tmp_path):
    src = tmp_path / "c.json"
    src.write_text(json.dumps(tiny_config_dict()))
    cfg = load_config(str(src), ["optim.lr=0.001", "adapter.rank_schedule=[[0,4],[2,2]]", "name=x"])
    assert cfg.optim.lr == 0.001 and cfg.name == "x"
    assert [cfg.adapter.rank_of(t) for t in range(4)] == [4, 4, 2, 2]
    atomic_write_json(str(tmp_path / "resolved.json"), config_to_dict(cfg))
    again = load_config(str(tmp_path / "resolved.json"))
    assert again == cfg
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(str(src), ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.json"))
