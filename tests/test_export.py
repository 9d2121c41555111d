"""Export (sdlora_ds/export.py, launch/export.py): a run's final model becomes a plain
ViTForImageClassification folder whose `pipeline("image-classification")` predictions equal the
trainer's own on every test sample (reduced run: 3 tasks, rank schedule, KD merges included)."""
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, tiny_config_dict
from sdlora_ds.config import BackboneConfig, DataConfig, config_from_dict

sys.path.insert(0, os.path.join(ROOT, "launch"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished reduced run on digits shards with a small 'pretrained' (random, saved) backbone."""
    from transformers import ViTModel
    from sdlora_ds.model.backbone import vit_config
    from sdlora_ds.trainer import Trainer
    from shards.digits import write_digits_shards
    root = tmp_path_factory.mktemp("export")
    index = write_digits_shards(str(root / "shards"))
    arch = tiny_config_dict()["backbone"]
    torch.manual_seed(0)
    ViTModel(vit_config(BackboneConfig(**arch)), add_pooling_layer=False).save_pretrained(str(root / "backbone"))
    raw = tiny_config_dict(index=index, name="run", output_dir=str(root / "runs"),
                           backbone={"source": "pretrained", "path": str(root / "backbone")},
                           adapter={"rank": 4, "rank_schedule": [[0, 4], [2, 2]],
                                    "kd": {"enabled": True, "threshold": 1.0}},  # every task-1 direction folds
                           cil={"num_classes": 10, "init_classes": 4, "increment": 3, "num_tasks": 3},
                           data={"interpolation": "bilinear"},
                           optim={"epochs": 1, "global_batch": 16, "lr": 0.05, "max_steps_per_epoch": 4})
    trainer = Trainer(config_from_dict(raw))
    trainer.run()
    assert any(e["event"] == "kd_merge" for e in trainer.model.events)
    return trainer, str(root / "runs" / "run"), root


def trainer_predictions(trainer):
    """The trainer's own evaluation path after the last task: (positions predicted, class ids, logits)."""
    t = trainer.cfg.cil.num_tasks - 1
    preds, labels, logits = [], [], []
    trainer.model.eval()
    with torch.no_grad(), trainer.model.merged_eval():
        for images, y in trainer.loader(t, train=False):
            out = trainer.model(images)
            logits.append(out)
            preds += out.argmax(1).tolist()
            labels += y.tolist()
    return preds, labels, torch.cat(logits)


def images_in_loader_order(trainer):
    """PIL test images and class ids, in the order the (1-rank) eval loader yields them."""
    seen = set(trainer.schedule.seen_classes(trainer.cfg.cil.num_tasks - 1))
    images, ids = [], []
    for path, _, _ in trainer.index.shards(trainer.cfg.data.test_split, seen):
        with tarfile.open(path) as tf:
            members = [m for m in tf.getmembers() if m.isfile()]
            by_key = {}
            for m in members:
                by_key.setdefault(m.name.split(".", 1)[0], {})[m.name.split(".", 1)[1]] = m
            for key, parts in by_key.items():
                c = int(tf.extractfile(parts["cls"]).read())
                if c in seen:
                    with Image.open(io.BytesIO(tf.extractfile(parts["png"]).read())) as im:
                        im.load()
                        images.append(im.copy())
                    ids.append(c)
    return images, ids


def test_pipeline_predictions_equal_the_trainers(run, tmp_path):
    import export as export_cli
    from transformers import ViTForImageClassification, ViTImageProcessor
    from sdlora_ds.export import predict_labels
    trainer, run_dir, _ = run
    out = str(tmp_path / "exported")
    assert export_cli.main(["--run", run_dir, "--out", out]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "preprocessor_config.json"]

    preds, labels, logits = trainer_predictions(trainer)
    images, ids = images_in_loader_order(trainer)
    assert ids == labels and len(ids) == trainer.index.count("test", range(10))
    names = trainer.index.class_names
    want = [names[trainer.schedule.order[p]] for p in preds]  # head row p scores class_order[p]
    got = predict_labels(out, images, batch_size=128)
    assert got == want  # the same argmax on every test sample
    assert 0 < sum(w == names[c] for w, c in zip(want, ids)) < len(ids)  # a real, imperfect model

    # from_pretrained + the saved processor reproduce the logits themselves
    hf = ViTForImageClassification.from_pretrained(out).eval()
    proc = ViTImageProcessor.from_pretrained(out)
    assert proc.size["shortest_edge"] == 32 and proc.do_center_crop and not proc.do_normalize
    with torch.no_grad():
        pix = proc(images, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(hf(pixel_values=pix).logits, logits, rtol=1e-4, atol=1e-4)
    assert [hf.config.id2label[i] for i in range(10)] == [names[c] for c in trainer.schedule.order]
    # a plain ViT: no adapter tensors left in the export
    assert all("lora" not in k and "frozen" not in k and "cur" not in k for k in hf.state_dict())


def test_export_refuses_a_changed_backbone_and_a_missing_run(run, tmp_path, capsys):
    import export as export_cli
    from transformers import ViTModel
    from sdlora_ds.export import export_run
    from sdlora_ds.model.backbone import vit_config
    _, run_dir, root = run
    assert export_cli.main(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "config.json" in err
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    other = tmp_path / "other_backbone"
    torch.manual_seed(123)
    ViTModel(vit_config(BackboneConfig(**{**cfg["backbone"], "source": "config"})),
             add_pooling_layer=False).save_pretrained(str(other))
    cfg["backbone"]["path"] = str(other)
    moved = tmp_path / "moved_run"
    moved.mkdir()
    (moved / "config.json").write_text(json.dumps(cfg))
    (moved / "final_model.pt").write_bytes(open(os.path.join(run_dir, "final_model.pt"), "rb").read())
    with pytest.raises(ValueError, match="backbone.path"):
        export_run(str(moved), str(tmp_path / "o2"))


def test_processor_matches_test_transform_with_normalisation():
    from sdlora_ds.data.transforms import build_transform
    from sdlora_ds.export import image_processor
    d = DataConfig(index="x", image_size=32, test_resize=36, interpolation="bicubic",
                   mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))  # square: same geometry
    want = build_transform(d, train=False)(im)
    got = image_processor(d)(im, return_tensors="pt")["pixel_values"][0]
    assert got.shape == want.shape == (3, 32, 32)
    # resampling: PIL (trainer) vs torch uint8 antialias (processor) differ by at most one grey level
    assert (got - want).abs().max() <= 1.01 / 255 / 0.2
