"""Export (sdlora_ds/export.py, sdlora_ds/cli/export.py): a run's final model becomes a plain
ViTForImageClassification folder whose `pipeline("image-classification")` predictions equal the
trainer's own on every test sample (reduced run: 3 tasks, rank schedule, KD merges included)."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config_dict
from sdlora_ds.config import BackboneConfig, DataConfig, config_from_dict


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
    from sdlora_ds.cli import export as export_cli
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
    from sdlora_ds.cli import export as export_cli
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


# ------------------------------------------------------------------ DINOv2 backbones
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
DINO = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_size=64, patch_size=14, image_size=28)


def trained_like(model, tasks=(4, 3, 3)):
    """Three tasks with random (non-zero) directions, magnitudes and head: what training leaves."""
    g = torch.Generator().manual_seed(1)
    for t, n in enumerate(tasks):
        model.start_task(t, n)
        with torch.no_grad():
            for layer in model.layers:
                layer.b_cur.copy_(torch.randn(layer.b_cur.shape, generator=g) * 0.3)
            model.magnitudes.m.copy_(1 + 0.5 * torch.rand(model.magnitudes.m.shape, generator=g))
            model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("arch", ["dinov2", "dinov2_with_registers"])
def test_dinov2_merged_and_exported_logits_equal_the_unmerged_forward(arch, tmp_path):
    """A saved DINOv2 (native 28 px = 2x2 patches) run at 42 px (3x3): the position embeddings are
    interpolated in training, merged evaluation and the export alike."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from conftest import tiny_config_dict
    from sdlora_ds.config import config_to_dict
    from sdlora_ds.fileio import atomic_write_json
    from sdlora_ds.export import FINAL_MODEL, export_model, export_run, load_final_model, save_final_model
    from sdlora_ds.model import SDLoRAModel
    from sdlora_ds.model.backbone import build_backbone
    torch.manual_seed(0)
    build_backbone(BackboneConfig(source="config", arch=arch, **DINO)).save_pretrained(str(tmp_path / "bb"))
    raw = tiny_config_dict(backbone={"source": "pretrained", "path": str(tmp_path / "bb")},
                           data={"image_size": 42, "test_resize": 48, **IMAGENET}, adapter={"rank": 2})
    cfg = config_from_dict(raw)
    model = trained_like(SDLoRAModel(cfg))
    x = torch.rand(3, 3, 42, 42, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = model(x)
        with model.merged_eval():
            merged = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert unmerged.std() > 0.1  # the adapters and head are not trivial

    names = [f"c{j}" for j in range(10)]
    hf = export_model(model, names, cfg.data, str(tmp_path / "out"))  # _verify runs inside
    assert type(hf).__name__ == {"dinov2": "Dinov2ForImageClassification",
                                 "dinov2_with_registers": "Dinov2WithRegistersForImageClassification"}[arch]
    assert torch.equal(hf.classifier.weight[:, 32:], torch.zeros(10, 32))  # the patch-mean half
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, unmerged, rtol=1e-4, atol=1e-4)
        loaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out")).eval()
        assert type(loaded) is type(hf)
        torch.testing.assert_close(loaded(pixel_values=x).logits, unmerged, rtol=1e-4, atol=1e-4)
    assert all("lora" not in k and "frozen" not in k and "cur" not in k for k in loaded.state_dict())
    proc = AutoImageProcessor.from_pretrained(str(tmp_path / "out"))
    assert proc.do_normalize and list(proc.image_mean) == IMAGENET["mean"] and list(proc.image_std) == IMAGENET["std"]
    assert proc.crop_size == {"height": 42, "width": 42}
    from sdlora_ds.export import predict_labels
    ims = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)) for i in range(4)]
    with torch.no_grad():
        want = loaded(pixel_values=proc(ims, return_tensors="pt")["pixel_values"]).logits.argmax(1).tolist()
    assert predict_labels(str(tmp_path / "out"), ims) == [names[j] for j in want]  # pipeline() on the export

    # the run's final-model file round-trips and exports the same model
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    atomic_write_json(str(run_dir / "config.json"), config_to_dict(cfg))
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    save_final_model(str(run_dir / FINAL_MODEL), model, cfg, order, names)
    again, _, payload = load_final_model(str(run_dir))
    assert not payload["full_state"] and again.backbone.config.model_type == arch
    with torch.no_grad(), again.merged_eval():
        torch.testing.assert_close(again(x), unmerged, rtol=1e-4, atol=1e-4)
    export_run(str(run_dir), str(tmp_path / "out2"))
    exported = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out2")).eval()
    assert [exported.config.id2label[i] for i in range(10)] == [names[c] for c in order]
    with torch.no_grad():
        torch.testing.assert_close(exported(pixel_values=x).logits, unmerged, rtol=1e-4, atol=1e-4)


def test_config_built_dinov2_round_trips_through_the_final_model_file(tmp_path):
    """source='config' (random init): the backbone weights travel in the file (full_state)."""
    from conftest import tiny_config_dict
    from sdlora_ds.config import config_to_dict
    from sdlora_ds.fileio import atomic_write_json
    from sdlora_ds.export import FINAL_MODEL, export_run, load_final_model, save_final_model
    from sdlora_ds.model import SDLoRAModel
    raw = tiny_config_dict(backbone={"arch": "dinov2_with_registers", "num_register_tokens": 2, **DINO},
                           data={"image_size": 28, "test_resize": 28}, adapter={"rank": 2})
    cfg = config_from_dict(raw)
    torch.manual_seed(5)
    model = trained_like(SDLoRAModel(cfg))
    atomic_write_json(str(tmp_path / "config.json"), config_to_dict(cfg))
    save_final_model(str(tmp_path / FINAL_MODEL), model, cfg, list(range(10)), [str(c) for c in range(10)])
    again, _, payload = load_final_model(str(tmp_path))
    assert payload["full_state"]
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(again(x), want, rtol=1e-5, atol=1e-5)
    before = os.umask(0o022)
    try:
        export_run(str(tmp_path), str(tmp_path / "out"))  # _verify passes
        os.umask(0o027)
        export_run(str(tmp_path), str(tmp_path / "out27"))
    finally:
        os.umask(before)
    # the usual modes (0666 minus the umask), never a private 0600 weights file
    for out, mode in (("out", 0o644), ("out27", 0o640)):
        for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
            assert os.stat(tmp_path / out / name).st_mode & 0o777 == mode, (out, name)


def test_export_out_in_the_way_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """--out naming a file, or a folder below a file: one line, exit 2, before the run is loaded."""
    from sdlora_ds.cli import export as export_cli
    import sdlora_ds.export as E

    def no_work(*a, **k):
        raise AssertionError("the run was loaded before --out was checked")
    monkeypatch.setattr(E, "load_final_model", no_work)
    (tmp_path / "a_file").write_text("x")
    for out, want in ((tmp_path / "a_file", "is a file, not a folder"),
                      (tmp_path / "a_file" / "below" / "x", f"{str(tmp_path / 'a_file')!r} is a file, not a folder")):
        assert export_cli.main(["--run", str(tmp_path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: --out {str(out)!r}") and want in err, err


def test_imagenet_normalisation_in_train_and_test_transforms_and_processor():
    from sdlora_ds.data.transforms import build_transform
    from sdlora_ds.export import image_processor
    d = DataConfig(index="x", image_size=28, test_resize=32, interpolation="bilinear", hflip=False,
                   train_scale=[1.0, 1.0], train_ratio=[1.0, 1.0], **IMAGENET)
    rgb = (200, 100, 30)
    im = Image.new("RGB", (40, 40), rgb)  # constant: every resampling gives the same pixels
    want = torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, IMAGENET["mean"], IMAGENET["std"])])
    for got in (build_transform(d, train=True)(im), build_transform(d, train=False)(im),
                image_processor(d)(im, return_tensors="pt")["pixel_values"][0]):
        assert got.shape == (3, 28, 28)
        torch.testing.assert_close(got, want[:, None, None].expand(3, 28, 28), rtol=0, atol=1e-5)
