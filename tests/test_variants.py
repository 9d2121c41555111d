"""SD-LoRA variants through config: rank schedule (-RR) with its checkpoint round trip, magnitude
init / reset, and the two normalisations; the shipped _rr / _kd configs."""
import glob
import io
import os

import pytest
import torch

from conftest import ROOT, tiny_config_dict
from sdlora_ds.config import config_from_dict, load_config
from sdlora_ds.model import SDLoRAModel


def model(**adapter):
    return SDLoRAModel(config_from_dict(tiny_config_dict(adapter={"rank": 4, **adapter})))


def test_rank_schedule_gives_configured_ranks_and_checkpoint_roundtrips_them():
    sched = [[0, 5], [2, 3], [4, 2]]
    m = model(rank_schedule=sched)
    gen = torch.Generator().manual_seed(0)
    for t in range(5):
        m.start_task(t, 2)
        with torch.no_grad():
            for layer in m.layers:
                layer.b_cur.copy_(torch.randn(layer.b_cur.shape, generator=gen))
    want = [5, 5, 3, 3, 2]
    s = m.structure()
    assert s["frozen_ranks"] == [want[:4]] * len(m.layers) and s["current_ranks"] == [2] * len(m.layers)
    assert all(layer.a_frozen.shape[0] == sum(want[:4]) and layer.a_cur.shape == (2, 32) for layer in m.layers)
    # the file a run writes: structure + adapter state, through torch.save
    buf = io.BytesIO()
    torch.save({"structure": s, "state": m.adapter_state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert any(k.endswith("a_cur") for k in saved["state"])  # the current direction is part of it
    fresh = model(rank_schedule=sched)
    fresh.restore_structure(saved["structure"])
    missing, unexpected = fresh.load_state_dict(saved["state"], strict=False)
    assert not unexpected and set(missing) == fresh.pretrained_keys  # only the pretrained weights
    fresh.load_state_dict({k: v for k, v in m.state_dict().items() if k in fresh.pretrained_keys}, strict=False)
    assert fresh.structure() == s
    assert fresh.layers[0].col_task.tolist() == [0] * 5 + [1] * 5 + [2] * 3 + [3] * 3
    x = torch.rand(2, 3, 32, 32, generator=gen)
    torch.testing.assert_close(fresh(x), m(x))
    fresh.start_task(5, 2)  # and it continues with the schedule
    assert fresh.layers[0].a_cur.shape[0] == 2 and fresh.layers[0].frozen_ranks.tolist() == want


def test_magnitude_init_and_reset_through_the_model():
    m = model(magnitude_init=0.8, magnitude_reset=False)
    m.start_task(0, 2)
    assert m.magnitudes.m.tolist() == pytest.approx([0.8])
    with torch.no_grad():
        m.magnitudes.m.fill_(1.7)  # "learned"
    m.start_task(1, 2)
    assert m.magnitudes.m.tolist() == pytest.approx([1.7, 0.8])
    r = model(magnitude_init=0.8)  # reset (the reference): every magnitude back to the initial value
    r.start_task(0, 2)
    with torch.no_grad():
        r.magnitudes.m.fill_(1.7)
    r.start_task(1, 2)
    assert r.magnitudes.m.tolist() == pytest.approx([0.8, 0.8])


@pytest.mark.parametrize("norm", ["factors", "product"])
def test_normalisation_of_frozen_directions(norm):
    m = model(norm=norm)
    m.start_task(0, 2)
    layer = m.layers[0]
    with torch.no_grad():
        layer.b_cur.normal_()
    a, b = layer.a_cur.detach().clone(), layer.b_cur.detach().clone()
    m.start_task(1, 2)
    n = b.norm() * a.norm() if norm == "factors" else (b @ a).norm()
    assert float(layer.frozen_inv_norm[0]) == pytest.approx(1 / float(n), rel=1e-5)
    assert float((b @ a).norm() / (b.norm() * a.norm())) < 0.99  # the two options really differ here


SEEDS = ["imagenetr_b40", "imagenetr_b20", "imagenetr_b10", "cifar100_b10"]


@pytest.mark.parametrize("seed", SEEDS)
def test_rr_and_kd_configs_differ_from_their_seed_only_in_the_variant(seed):
    base = load_config(os.path.join(ROOT, "configs", f"{seed}.json"))
    rr = load_config(os.path.join(ROOT, "configs", f"{seed}_rr.json"))
    kd = load_config(os.path.join(ROOT, "configs", f"{seed}_kd.json"))
    assert [rr.adapter.rank_of(t) for t in range(12)] == [10] * 4 + [8] * 4 + [6] * 4  # the paper's RR
    assert kd.adapter.kd.enabled and kd.adapter.kd.threshold == 9e-4 and kd.adapter.rank_schedule is None
    for v, name in ((rr, f"{seed}_rr"), (kd, f"{seed}_kd")):
        assert v.name == name
        for section in ("backbone", "cil", "data", "optim", "dist", "train"):
            assert getattr(v, section) == getattr(base, section), section
    rr.adapter.rank_schedule, kd.adapter.kd = None, base.adapter.kd
    assert rr.adapter == base.adapter and kd.adapter == base.adapter


def test_every_demo_variant_config_has_its_own_run_name():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "demo_digits*.json")))
    names = [load_config(p).name for p in paths]
    assert len(set(names)) == len(names) >= 6
