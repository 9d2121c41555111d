"""Baselines (model/baselines.py): sequential single LoRA, linear probe, joint training; their
config rules, lifecycle, checkpoint structure, export, and trainer runs."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config_dict
from sdlora_ds.config import ConfigError, config_from_dict
from sdlora_ds.model import LinearProbeModel, SDLoRAModel, SeqLoRAModel, build_model


def build(method, **over):
    return build_model(config_from_dict(tiny_config_dict(method=method, **over)))


@pytest.mark.parametrize("over,field", [
    ({"method": "seq_lora", "adapter": {"kd": {"enabled": True}}}, "adapter.kd.enabled"),
    ({"method": "linear_probe", "adapter": {"rank_schedule": [[0, 4]]}}, "adapter.rank_schedule"),
    ({"method": "finetune"}, "method"),
    ({"cil": {"num_classes": 10, "init_classes": 4, "increment": 0, "num_tasks": 2}}, "cil.increment"),
    ({"cil": {"increment": -2}}, "cil.increment"),
])
def test_config_mistakes_name_their_field(over, field):
    with pytest.raises(ConfigError) as e:
        config_from_dict(tiny_config_dict(**over))
    assert f"'{field}'" in str(e.value)


def test_factory_and_joint_config():
    assert type(build("sdlora")) is SDLoRAModel
    assert type(build("seq_lora")) is SeqLoRAModel and type(build("linear_probe")) is LinearProbeModel
    joint = config_from_dict(tiny_config_dict(cil={"num_classes": 10, "init_classes": 10, "increment": 0,
                                                   "num_tasks": 1}))
    assert joint.cil.num_tasks == 1


def explicit_lora(layer, x):
    return x @ layer.weight.T + layer.bias + float(layer.scaling) * (x @ layer.lora_a.T @ layer.lora_b.T)


def test_seq_lora_is_one_lora_trained_through_all_tasks():
    torch.manual_seed(0)
    m = build("seq_lora")
    sd = build("sdlora")
    m.start_task(0, 2)
    sd.start_task(0, 2)
    # same initial factors as SD-LoRA's task 0 (same generator): the methods differ only afterwards
    assert torch.equal(m.layers[0].lora_a, sd.layers[0].a_cur) and m.layers[0].lora_b.abs().sum() == 0
    for t in range(3):
        if t:
            ids = [id(p) for layer in m.layers for p in (layer.lora_a, layer.lora_b)]
            before = [p.detach().clone() for layer in m.layers for p in (layer.lora_a, layer.lora_b)]
            m.start_task(t, 2)
            # the same tensors, not re-created or frozen
            assert ids == [id(p) for layer in m.layers for p in (layer.lora_a, layer.lora_b)]
            assert all(torch.equal(a, p) for a, p in zip(before, [p for l in m.layers for p in (l.lora_a, l.lora_b)]))
        m.set_trainable()
        params = m.trainable_parameters()
        assert len(params) == 2 * len(m.layers) + 2
        assert {n for n, p in m.named_parameters() if p.requires_grad} == {
            n for n, p in m.named_parameters() if n.endswith(("lora_a", "lora_b")) or n.startswith("head.")}
        b_before = m.layers[0].lora_b.detach().clone()
        opt = torch.optim.SGD(params, lr=0.5)
        x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 2, (8,))
        F.cross_entropy(m(x)[:, 2 * t:], y).backward()
        opt.step()
        assert not torch.equal(m.layers[0].lora_b, b_before)  # trained at every task
    layer = m.layers[1]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), explicit_lora(layer, x), rtol=1e-5, atol=1e-5)
        img = torch.rand(2, 3, 32, 32)
        y = m(img)
        with m.merged_eval():
            torch.testing.assert_close(m(img), y, rtol=1e-5, atol=1e-5)


def test_linear_probe_trains_only_the_head():
    m = build("linear_probe")
    m.start_task(0, 2)
    m.set_trainable()
    assert m.layers == [] and m.trainable_parameters() == [m.head.weight, m.head.bias]
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    m.start_task(1, 3)
    assert m.head.num_classes == 5 and m.known_classes == 2


@pytest.mark.parametrize("method", ["seq_lora", "linear_probe"])
def test_baseline_structure_roundtrip_and_export(method, tmp_path):
    from transformers import ViTForImageClassification
    from sdlora_ds.export import export_model
    torch.manual_seed(1)
    m = build(method)
    for t in range(2):
        m.start_task(t, 2)
    with torch.no_grad():
        for layer in m.layers:
            layer.lora_b.normal_()
    fresh = build(method)
    fresh.restore_structure(m.structure())
    missing, unexpected = fresh.load_state_dict(m.adapter_state_dict(), strict=False)
    assert not unexpected and set(missing) == fresh.pretrained_keys
    fresh.load_state_dict(m.state_dict())
    x = torch.rand(2, 3, 32, 32)
    m.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), m(x))
    cfg = config_from_dict(tiny_config_dict(method=method))
    export_model(m, ["a", "b", "c", "d", "spare"], cfg.data, str(tmp_path / "out"))  # verify=True checks logits
    hf = ViTForImageClassification.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, m(x), rtol=1e-4, atol=1e-4)
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}


@pytest.fixture(scope="module")
def digits_index(tmp_path_factory):
    from shards.digits import write_digits_shards
    return write_digits_shards(str(tmp_path_factory.mktemp("digits") / "shards"))


@pytest.mark.parametrize("method,cil", [
    ("seq_lora", {"num_classes": 10, "init_classes": 4, "increment": 3, "num_tasks": 3}),
    ("linear_probe", {"num_classes": 10, "init_classes": 4, "increment": 3, "num_tasks": 3}),
    ("sdlora", {"num_classes": 10, "init_classes": 10, "increment": 0, "num_tasks": 1}),  # joint
])
def test_trainer_runs_every_baseline(digits_index, tmp_path, method, cil):
    from sdlora_ds.trainer import Trainer
    raw = tiny_config_dict(index=digits_index, name=method, output_dir=str(tmp_path), method=method, cil=cil,
                           optim={"epochs": 1, "global_batch": 16, "lr": 0.05, "max_steps_per_epoch": 3})
    res = Trainer(config_from_dict(raw)).run()
    with open(tmp_path / method / "results.json") as f:
        disk = json.load(f)
    assert disk["method"] == method and disk["acc_matrix"] == res["acc_matrix"]
    assert [len(r) for r in res["acc_matrix"]] == list(range(1, cil["num_tasks"] + 1))
    assert (tmp_path / method / "final_model.pt").is_file()
    if cil["num_tasks"] == 1:
        assert res["setting"] == "B10-0-1" and res["forgetting"] == 0.0 and res["avg_acc"] == res["last_acc"]


def test_ncm_prototypes_and_cosine_logits_by_hand(tmp_path):
    from transformers import ViTForImageClassification
    from sdlora_ds.export import export_model
    from sdlora_ds.model import NCMModel
    torch.manual_seed(2)
    m = build("ncm")
    assert type(m) is NCMModel and m.trainable_parameters() == [] and not m.trains
    m.start_task(0, 2)
    sums, counts = torch.randn(2, 32) * 3, torch.tensor([3.0, 5.0])
    m.set_prototypes(0, sums, counts)
    x = torch.rand(4, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        f = m.features(x)
        means = sums / counts[:, None]
        cos = F.normalize(f, dim=-1) @ F.normalize(means, dim=-1).T  # (4, 2)
        torch.testing.assert_close(m(x), cos, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no train image"):
        m.start_task(1, 2)
        m.set_prototypes(2, torch.ones(2, 32), torch.tensor([1.0, 0.0]))
    m.set_prototypes(2, torch.ones(2, 32), torch.tensor([1.0, 2.0]))
    cfg = config_from_dict(tiny_config_dict(method="ncm"))
    export_model(m, ["a", "b", "c", "d"], cfg.data, str(tmp_path / "out"))  # checks export_logits
    hf = ViTForImageClassification.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():  # a plain linear head: logits = ||f|| * cosines, the same predictions
        assert torch.equal(hf(pixel_values=x).logits.argmax(1), m(x).argmax(1))


def test_trainer_ncm_uses_every_train_image_once(digits_index, tmp_path):
    from sdlora_ds.data import ShardIndex, build_loader
    from sdlora_ds.trainer import Trainer
    cil = {"num_classes": 10, "init_classes": 4, "increment": 3, "num_tasks": 3}
    raw = tiny_config_dict(index=digits_index, name="ncm", output_dir=str(tmp_path), method="ncm", cil=cil,
                           train={"probe_size": 4})
    cfg = config_from_dict(raw)
    tr = Trainer(cfg)
    res = tr.run()
    assert res["loss_log"] == [] and [len(r) for r in res["acc_matrix"]] == [1, 2, 3]
    idx = ShardIndex.load(digits_index)
    ev = [e for e in res["events"] if e["kind"] == "ncm_class_means"]
    assert [e["images"] for e in ev] == [idx.count("train", tr.schedule.classes(t)) for t in range(3)]
    # head rows = normalised means of the frozen features over each class's train images
    model = tr.model.eval()
    loader = build_loader(idx, cfg.data, split="train", class_ids=list(range(10)), train=False, batch_size=64,
                          rank=0, world_size=1, seed=0)
    feats, labels = [], []
    with torch.no_grad():
        for images, lab in loader:
            feats.append(model.features(images)[lab >= 0])
            labels.append(lab[lab >= 0])
    feats, labels = torch.cat(feats).double(), torch.cat(labels)
    for row, cls in enumerate(res["class_order"]):
        proto = F.normalize(feats[labels == cls].mean(0), dim=0)
        torch.testing.assert_close(model.head.weight[row].double(), proto, rtol=1e-5, atol=1e-6)
    assert all(r["feature_change_at_boundary"] == 0.0 for r in res["boundaries"])  # nothing trains
