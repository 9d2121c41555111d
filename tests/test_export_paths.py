"""Export from another directory (sdlora_ds/export.py resolve_backbone_path, sdlora-export): a
relative backbone.path in a run's config.json is taken from the folder training ran in (the run
folder minus output_dir/name), then from the current directory; neither -> one error line."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_config_dict
from sdlora_ds.config import BackboneConfig, config_from_dict, config_to_dict
from sdlora_ds.fileio import atomic_write_json


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run trained 'in' tmp/work with backbone.path='bb' and output_dir='runs' (both relative)."""
    from transformers import ViTModel
    from sdlora_ds.export import FINAL_MODEL, save_final_model
    from sdlora_ds.model import SDLoRAModel
    from sdlora_ds.model.backbone import vit_config
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    arch = tiny_config_dict()["backbone"]
    torch.manual_seed(0)
    ViTModel(vit_config(BackboneConfig(**arch)), add_pooling_layer=False).save_pretrained("bb")
    cfg = config_from_dict(tiny_config_dict(name="r", output_dir="runs",
                                            backbone={"source": "pretrained", "path": "bb"}))
    model = SDLoRAModel(cfg)
    model.start_task(0, 2)
    os.makedirs(cfg.run_dir)
    atomic_write_json(os.path.join(cfg.run_dir, "config.json"), config_to_dict(cfg))
    save_final_model(os.path.join(cfg.run_dir, FINAL_MODEL), model.eval(), cfg, list(range(10)),
                     [str(c) for c in range(10)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # export runs from another directory
    return work


def test_training_dir_from_the_run_folder(tmp_path):
    from sdlora_ds.export import training_dir
    cfg = config_from_dict(tiny_config_dict(name="r", output_dir="runs"))
    assert training_dir("/a/b/runs/r", cfg) == "/a/b"
    assert training_dir("/a/b/other/r", cfg) is None  # moved
    cfg = config_from_dict(tiny_config_dict(name="r", output_dir="out/nested"))
    assert training_dir("/x/out/nested/r/", cfg) == "/x"
    assert training_dir("/x/r", config_from_dict(tiny_config_dict(name="r", output_dir="/abs"))) is None


def test_export_from_another_directory(run, tmp_path):
    from sdlora_ds.export import export_run, load_final_model
    _, cfg, _ = load_final_model(str(run / "runs" / "r"))
    assert cfg.backbone.path == str(run / "bb")
    export_run(str(run / "runs" / "r"), str(tmp_path / "exported"))  # logits verified against the model
    assert (tmp_path / "exported" / "model.safetensors").exists()


def test_export_of_a_moved_run_names_both_places(run, tmp_path):
    moved = tmp_path / "moved" / "r"
    shutil.copytree(run / "runs" / "r", moved)
    r = subprocess.run([sys.executable, "-m", "sdlora_ds.cli.export", "--run", str(moved), "--out",
                        str(tmp_path / "o")], cwd=str(tmp_path / "elsewhere"), capture_output=True, text=True,
                       timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "'backbone.path'" in lines[0] and "'bb'" in lines[0] and str(tmp_path / "elsewhere") in lines[0]
    # from the folder training ran in, the old rule (the current directory) still finds it
    r = subprocess.run([sys.executable, "-m", "sdlora_ds.cli.export", "--run", str(moved), "--out",
                        str(tmp_path / "o")], cwd=str(run), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
