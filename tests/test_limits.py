import json

import pytest
import torch

from conftest import tiny_config_dict
from sdlora_ds.config import AdapterConfig, ConfigError, config_from_dict
from sdlora_ds.limits import (INT32_LIMIT, check_plan, frozen_factor_bytes, max_tasks, pretrained_width,
                              total_rank)


def long_run(num_tasks: int, **adapter) -> dict:
    """A tiny-ViT (width 32) config of `num_tasks` one-class tasks."""
    return tiny_config_dict(adapter=adapter, cil={"num_classes": num_tasks, "init_classes": 1, "increment": 1,
                                                  "num_tasks": num_tasks})


def test_total_rank_follows_the_schedule():
    rr = AdapterConfig(rank_schedule=[[0, 10], [4, 8], [8, 6]])
    assert total_rank(rr, 3) == 30 and total_rank(rr, 5) == 48 and total_rank(rr, 10) == 40 + 32 + 12
    assert total_rank(rr, 200) == 40 + 32 + 6 * 192
    assert total_rank(AdapterConfig(rank=10), 200) == 2000
    # ViT-B/16, 24 query/value projections of 768 x 768, fp32: 1.47 MB of frozen factors per rank-10 task
    assert frozen_factor_bytes(AdapterConfig(rank=10), 200, 768, 768, 24) == 2000 * 1536 * 24 * 4


def test_max_tasks_is_the_last_addressable_count():
    for adapter in (AdapterConfig(rank=10), AdapterConfig(rank_schedule=[[0, 10], [4, 8], [8, 6]])):
        t = max_tasks(adapter, 768)
        assert total_rank(adapter, t) * 768 < INT32_LIMIT <= total_rank(adapter, t + 1) * 768
    assert max_tasks(AdapterConfig(rank=10), 768) == 279_620


def test_a_plan_at_the_limit_loads_and_one_task_more_is_refused_naming_num_tasks():
    limit = max_tasks(AdapterConfig(rank=32), 32)
    assert config_from_dict(long_run(limit, rank=32)).cil.num_tasks == limit
    with pytest.raises(ConfigError) as e:
        config_from_dict(long_run(limit + 1, rank=32))
    msg = str(e.value)
    assert msg.startswith("config field 'cil.num_tasks':") and f"at most {limit:,} tasks" in msg and "\n" not in msg


@pytest.mark.parametrize("adapter,field", [({"rank": 33}, "adapter.rank"),
                                           ({"rank_schedule": [[0, 4], [2, 40]]}, "adapter.rank_schedule")])
def test_a_rank_wider_than_the_backbone_is_refused(adapter, field):
    with pytest.raises(ConfigError) as e:
        config_from_dict(tiny_config_dict(adapter=adapter))
    assert str(e.value).startswith(f"config field '{field}':") and "rank <= 32" in str(e.value)


def test_other_methods_stack_nothing_and_are_not_limited():
    cfg = config_from_dict(long_run(10, rank=4))
    cfg.method, cfg.cil.num_tasks = "seq_lora", 10 ** 9  # no per-task directions: nothing to refuse
    check_plan(cfg, 32)


def test_pretrained_width_reads_a_folder_or_a_safetensors_header(tmp_path):
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 768}))
    assert pretrained_width(str(folder)) == 768
    from safetensors.torch import save_file
    save_file({"patch_embed.proj.weight": torch.zeros(384, 3, 16, 16), "cls_token": torch.zeros(1, 1, 384)},
              str(tmp_path / "timm.safetensors"))
    assert pretrained_width(str(tmp_path / "timm.safetensors")) == 384
    assert pretrained_width(str(tmp_path / "missing")) is None


def test_preflight_refuses_a_pretrained_plan_over_the_limit(tmp_path):
    from sdlora_ds.preflight import check
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 768}))
    raw = long_run(300_000, rank=10)
    raw["backbone"] = {"source": "pretrained", "path": str(folder)}
    cfg = config_from_dict(raw)  # the width of a pretrained backbone is unknown to the config alone
    with pytest.raises(ConfigError, match=r"^config field 'cil.num_tasks': .*at most 279,620 tasks"):
        check(cfg, None)
