"""SD-LoRA-KD (model/kd.py): exact combinations are folded without changing the function the next
task starts from; independent and zero directions are kept; the fold survives a checkpoint; the
trainer records merges in results.json and TensorBoard."""
import copy
import json
import os

import pytest
import torch

from conftest import tiny_config_dict
from sdlora_ds.config import config_from_dict
from sdlora_ds.model import SDLoRAModel
from sdlora_ds.model.kd import fit_direction


def kd_model(**adapter):
    over = {"rank": 4, "kd": {"enabled": True, "threshold": 9e-4}, **adapter}
    return SDLoRAModel(config_from_dict(tiny_config_dict(adapter=over)))


def randomise_current(model, gen):
    with torch.no_grad():
        for layer in model.layers:
            layer.b_cur.copy_(torch.randn(layer.b_cur.shape, generator=gen))


def set_magnitudes(model, gen):
    """Stand-in for training: magnitudes away from their initial value."""
    with torch.no_grad():
        model.magnitudes.m.copy_(torch.rand(model.magnitudes.num_tasks, generator=gen) + 0.5)


def frozen_factors(layer, i):
    cols = layer.task_columns(i)
    return layer.a_frozen[cols].clone(), layer.b_frozen[:, cols].clone(), float(layer.frozen_inv_norm[i])


@pytest.mark.parametrize("init,reset,norm", [(1.0, True, "factors"), (0.8, False, "factors"), (0.8, False, "product")])
def test_exact_combination_is_merged_and_function_preserved(init, reset, norm):
    """Task 2 (rank 8) in projection 0 is exactly 0.7 D_0 - 1.3 D_1; every other direction is random.
    With reset=False the direction carries its learned magnitude (not 1) into task 3: adding the
    bare coefficients (LibContinual) would change the outputs, the fold must not."""
    gen = torch.Generator().manual_seed(0)
    m = kd_model(rank_schedule=[[0, 4], [2, 8], [3, 4]], magnitude_init=init, magnitude_reset=reset, norm=norm)
    for t in range(2):
        m.start_task(t, 2)
        randomise_current(m, gen)
        set_magnitudes(m, gen)
    m.start_task(2, 2)  # KD for task 1: random directions, nothing folds
    assert [e["event"] for e in m.events] == ["kd_fit"] and m.events[0]["merged"] == 0
    randomise_current(m, gen)
    target = m.layers[0]
    a0, b0, inv0 = frozen_factors(target, 0)
    a1, b1, inv1 = frozen_factors(target, 1)
    with torch.no_grad():  # B_2 A_2 = 0.7 D_0 - 1.3 D_1 exactly, as a rank-8 factorisation
        target.a_cur.copy_(torch.cat([a0, a1]))
        target.b_cur.copy_(torch.cat([0.7 * inv0 * b0, -1.3 * inv1 * b1], dim=1))
    set_magnitudes(m, gen)
    plain = copy.deepcopy(m)
    plain.adapter_cfg.kd.enabled = False  # the same model, without the merge
    x = torch.rand(3, 3, 32, 32, generator=gen)
    m.start_task(3, 2)
    plain.start_task(3, 2)

    merges = [e for e in m.events if e["event"] == "kd_merge"]
    assert len(merges) == 1
    ev = merges[0]
    assert (ev["task"], ev["block"], ev["projection"], ev["module"]) == (2, 0, "q_proj", m.layer_names[0])
    assert ev["residual"] < 1e-12
    carried = float(m.magnitudes()[2].detach())  # what D_2 would carry into task 3
    assert ev["carried_magnitude"] == pytest.approx(carried)
    assert carried != pytest.approx(1.0) or reset  # the non-trivial case is covered
    assert [i for i, _ in ev["alpha"]] == [0, 1]
    # alpha is the fit of the NORMALISED direction: D_2 = (0.7 D_0 - 1.3 D_1) * inv_2
    inv2 = float(plain.layers[0].frozen_inv_norm[2])
    assert [a for _, a in ev["alpha"]] == pytest.approx([0.7 * inv2, -1.3 * inv2], rel=1e-5)
    summary = m.events[-1]
    assert summary["event"] == "kd_fit" and summary["task"] == 2 and summary["merged"] == 1
    assert summary["fitted"] == len(m.layers) and summary["residuals"][m.layer_names[0]] < 1e-12

    # assimilated magnitudes of projection 0 updated, its task-2 direction zeroed and skipped
    layer = m.layers[0]
    cols = layer.task_columns(2)
    assert layer.a_frozen[cols].abs().sum() == 0 and layer.b_frozen[:, cols].abs().sum() == 0
    assert float(layer.frozen_inv_norm[2]) == 0.0
    torch.testing.assert_close(layer.frozen_k, torch.tensor([carried * 0.7 * inv2, -carried * 1.3 * inv2, 0.0]),
                               rtol=1e-5, atol=1e-7)
    assert m.magnitudes.k.abs().sum() == 0  # the shared k is not what KD writes
    # independent directions are kept untouched
    for mine, ref in zip(m.layers[1:], plain.layers[1:]):
        assert torch.equal(mine.a_frozen, ref.a_frozen) and torch.equal(mine.b_frozen, ref.b_frozen)
        assert torch.equal(mine.frozen_inv_norm, ref.frozen_inv_norm) and mine.frozen_k.abs().sum() == 0
    # the function task 3 starts from is the unmerged model's
    m.eval(), plain.eval()
    torch.testing.assert_close(m(x), plain(x), rtol=1e-5, atol=1e-6)
    # ... and the merge is real: without the assimilated magnitudes the outputs change
    with torch.no_grad():
        layer.frozen_k.zero_()
    assert not torch.allclose(m(x), plain(x), rtol=1e-3, atol=1e-4)


def test_parallel_direction_at_task_1_and_folded_direction_left_out_later():
    gen = torch.Generator().manual_seed(1)
    m = kd_model()
    m.start_task(0, 2)
    randomise_current(m, gen)
    m.start_task(1, 2)
    randomise_current(m, gen)
    layer = m.layers[3]
    a0, b0, _ = frozen_factors(layer, 0)
    with torch.no_grad():  # B_1 A_1 = -2.5 B_0 A_0: D_1 = -D_0 (factors norm)
        layer.a_cur.copy_(a0)
        layer.b_cur.copy_(-2.5 * b0)
    m.start_task(2, 2)
    merges = [e for e in m.events if e["event"] == "kd_merge"]
    assert [(e["task"], e["module"]) for e in merges] == [(1, m.layer_names[3])]
    assert merges[0]["alpha"][0][1] == pytest.approx(-1.0, rel=1e-6)
    assert float(layer.frozen_k[0]) == pytest.approx(-1.0, rel=1e-6)  # carried = 1.0 (reset)
    # task 2: layer 3 fits on D_0 only (its D_1 is zero now), the others on D_0 and D_1
    randomise_current(m, gen)
    m.start_task(3, 2)
    assert fit_direction(layer, 2)[0] == [0]
    assert fit_direction(m.layers[0], 2)[0] == [0, 1]


def test_zero_direction_is_not_fitted_and_threshold_zero_merges_nothing():
    gen = torch.Generator().manual_seed(2)
    m = kd_model(kd={"enabled": True, "threshold": 0.0})
    m.start_task(0, 2)
    randomise_current(m, gen)
    m.start_task(1, 2)
    randomise_current(m, gen)
    with torch.no_grad():
        m.layers[0].b_cur.zero_()  # a direction that never trained: contributes nothing, nothing to fold
        m.layers[1].a_cur.copy_(m.layers[1].a_frozen)
        m.layers[1].b_cur.copy_(m.layers[1].b_frozen)  # exact copy: residual ~0, but not < 0
    m.start_task(2, 2)
    assert fit_direction(m.layers[0], 1) is None
    summary = m.events[-1]
    assert summary["merged"] == 0 and m.layer_names[0] not in summary["residuals"]
    assert summary["residuals"][m.layer_names[1]] < 1e-12
    json.dumps(m.events, allow_nan=False)  # strict JSON for results.json


def test_fold_survives_checkpoint_roundtrip():
    gen = torch.Generator().manual_seed(3)
    m = kd_model(kd={"enabled": True, "threshold": 1.0})  # residual <= ||D||^2 < 1: every direction folds
    for t in range(3):
        m.start_task(t, 2)
        randomise_current(m, gen)
    assert sum(e["event"] == "kd_merge" for e in m.events) == len(m.layers)  # task 1 in every projection
    assert all(float(layer.frozen_inv_norm[1]) == 0 for layer in m.layers)
    fresh = kd_model(kd={"enabled": True, "threshold": 1.0})
    fresh.restore_structure(m.structure())
    missing, unexpected = fresh.load_state_dict(m.adapter_state_dict(), strict=False)
    assert not unexpected and set(missing) == fresh.pretrained_keys
    fresh.load_state_dict(m.state_dict())  # same backbone (tiny random one), to compare outputs
    x = torch.rand(2, 3, 32, 32, generator=gen)
    torch.testing.assert_close(fresh(x), m(x))
    torch.testing.assert_close(fresh.layers[0].frozen_k, m.layers[0].frozen_k)


def test_trainer_records_merges_in_results_and_tensorboard(tmp_path):
    from sdlora_ds.logger import read_scalars
    from sdlora_ds.trainer import Trainer
    from shards.digits import write_digits_shards
    index = write_digits_shards(str(tmp_path / "shards"))
    raw = tiny_config_dict(index=index, name="kd", output_dir=str(tmp_path / "runs"),
                           adapter={"rank": 2, "kd": {"enabled": True, "threshold": 1.0}},
                           cil={"num_classes": 10, "init_classes": 4, "increment": 2, "num_tasks": 4},
                           optim={"epochs": 1, "global_batch": 16, "lr": 0.05, "max_steps_per_epoch": 2})
    res = Trainer(config_from_dict(raw)).run()
    with open(tmp_path / "runs" / "kd" / "results.json") as f:
        disk = json.load(f)
    merges = [e for e in disk["events"] if e["event"] == "kd_merge"]
    # threshold 1: tasks 1 and 2 fold in all 4 projections (the last task never folds)
    assert sorted({e["task"] for e in merges}) == [1, 2] and len(merges) == 8
    assert all({"task", "block", "projection", "residual"} <= set(e) for e in merges)
    assert disk["events"] == json.loads(json.dumps(res["events"]))
    scalars = read_scalars(str(tmp_path / "runs" / "kd" / "tensorboard"))
    assert [v for _, v in scalars["kd/merged_projections"]] == [4.0, 4.0]
