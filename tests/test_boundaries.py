"""Task-boundary diagnostics (sdlora_ds/boundaries.py, SDLoRAModel's boundary record) against hand
computations on a tiny model, the 'continuous' freeze, and the records of a real run."""
import json
import math
import os
import statistics

import pytest
import torch

from conftest import tiny_config_dict
from sdlora_ds.config import config_from_dict
from sdlora_ds.boundaries import (METRICS, BoundaryRecorder, format_boundaries, projection_group, relative_change,
                                   summarize_adapters)
from sdlora_ds.model import build_model


def _model(**adapter):
    torch.manual_seed(0)
    cfg = config_from_dict(tiny_config_dict(adapter={"rank": 2, "impl": "reference", **adapter}))
    return build_model(cfg)


def _set_factors(model, m_value: float):
    """Known factors per projection: B = (l + 1) * 0.01 * ones, A as drawn; the task's magnitude m."""
    with torch.no_grad():
        for l, layer in enumerate(model.layers):
            layer.b_cur.fill_((l + 1) * 0.01)
        model.magnitudes.m.fill_(m_value)


def test_boundary_record_by_hand():
    model = _model(magnitude_init=1.0)
    model.start_task(0, 2)
    _set_factors(model, 0.7)
    expect = []
    for layer in model.layers:
        a, b = layer.a_cur.detach().double(), layer.b_cur.detach().double()
        nb, na, nba = b.norm().item(), a.norm().item(), (b @ a).norm().item()
        after = 1.0 / (nb * na)  # re-created magnitude 1.0 on the normalised direction
        expect.append(dict(norm_b=nb, norm_a=na, norm_ba=nba, coef_before=0.7, coef_after=after, jump=after / 0.7))
    model.start_task(1, 2)
    rec = model.boundary
    assert rec["task"] == 0 and rec["m_end"] == pytest.approx([0.7])
    assert [r["name"] for r in rec["layers"]] == model.layer_names
    for got, want in zip(rec["layers"], expect):
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-6), k
    # summaries: min / median / max over the blocks, q and v apart
    summary = summarize_adapters(rec)
    assert set(summary) == {"q", "v"}
    for g in ("q", "v"):
        vals = [e["jump"] for e, name in zip(expect, model.layer_names) if projection_group(name) == g]
        assert len(vals) == 2  # two blocks
        s = summary[g]["jump"]
        assert (s["min"], s["median"], s["max"]) == pytest.approx((min(vals), statistics.median(vals), max(vals)))


def test_continuous_freeze_preserves_the_function_and_normalize_does_not():
    x = torch.rand(3, 3, 32, 32)
    for freeze, same in (("continuous", True), ("normalize", False)):
        model = _model(freeze=freeze, magnitude_init=1.0)
        model.start_task(0, 2)
        _set_factors(model, 0.7)
        model.eval()
        with torch.no_grad():
            before = model.features(x)
            model.start_task(1, 2)  # new direction B = 0: only the freeze can change the function
            after = model.features(x)
            if freeze == "continuous":
                assert all(r["jump"] == pytest.approx(1.0, abs=1e-5) for r in model.boundary["layers"])
                # the magnitudes were re-created at 1.0; k^p carries the rest: (1.0 + k^p) / norm = 0.7
                layer = model.layers[0]
                assert float(model.magnitudes.m[0]) == 1.0
                assert float((1.0 + layer.frozen_k[0]) * layer.frozen_inv_norm[0]) == pytest.approx(0.7, rel=1e-5)
            if same:
                torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
            else:
                assert relative_change(before, after) > 1e-3


def test_continuous_keeps_older_directions_through_a_magnitude_reset():
    model = _model(freeze="continuous", magnitude_init=1.0)
    x = torch.rand(2, 3, 32, 32)
    model.start_task(0, 2)
    _set_factors(model, 0.7)
    model.start_task(1, 2)
    _set_factors(model, 1.3)  # task 1 trains both magnitudes (m_0 moves too) and its own B
    with torch.no_grad():
        model.magnitudes.m[0] = 0.9
        before = model.features(x)
        model.start_task(2, 2)  # m_0, m_1 re-created at 1.0: k^p absorbs both
        after = model.features(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert model.boundary["m_end"] == pytest.approx([0.9, 1.3])


def test_relative_change_and_recorder_by_hand():
    f0 = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # ||F|| = 5
    f1 = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert relative_change(f0, f1) == pytest.approx(0.2)
    rec = BoundaryRecorder()
    assert rec.task_end(0, f0) is None  # nothing before task 0
    assert rec.task_start(1, f1) == pytest.approx(0.2)
    f2 = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert rec.task_end(1, f2) == pytest.approx(0.4)
    assert rec.records == [{"task": 0, "feature_change_at_boundary": pytest.approx(0.2),
                            "feature_change_after_next_task": pytest.approx(0.4)}]
    back = BoundaryRecorder()
    back.load_state_dict(json.loads(json.dumps(rec.state_dict())))  # what a checkpoint keeps
    assert back.records == rec.records and torch.equal(back.end_features, rec.end_features)
    assert back.task_start(2, f2 * 2) == pytest.approx(1.0)
    assert "boundary 0 -> 1" in format_boundaries(rec.records)


@pytest.fixture(scope="module")
def digits_index(tmp_path_factory):
    from shards.digits import write_digits_shards
    return write_digits_shards(str(tmp_path_factory.mktemp("digits") / "shards"))


def _run(index, out, name, **over):
    from sdlora_ds.trainer import Trainer
    raw = tiny_config_dict(index=index, name=name, output_dir=str(out),
                           cil={"num_classes": 10, "init_classes": 4, "increment": 3, "num_tasks": 3},
                           data={"train_scale": [1.0, 1.0], "train_ratio": [1.0, 1.0]},
                           optim={"epochs": 1, "global_batch": 16, "lr": 0.05},
                           train={"log_every": 5, "probe_size": 8}, **over)
    torch.manual_seed(0)
    return Trainer(config_from_dict(raw)).run()


def test_a_run_records_boundaries(digits_index, tmp_path):
    from sdlora_ds.logger import read_scalars
    res = _run(digits_index, tmp_path, "sd")
    b = res["boundaries"]
    assert [r["task"] for r in b] == [0, 1]
    for r in b:
        assert r["feature_change_at_boundary"] > 0 and r["feature_change_after_next_task"] > 0
        assert set(r["adapters"]) == {"q", "v"} and len(r["m_end"]) == r["task"] + 1
        for layer in r["layers"]:  # jump = coefficient after / before, as recorded
            assert layer["jump"] == pytest.approx(abs(layer["coef_after"] / layer["coef_before"]))
    steps = [s for s, _ in res["magnitude_log"]]
    assert steps[0] == 1 and all(s % 5 == 0 for s in steps[1:]) and len(res["magnitude_log"][-1][1]) == 3
    tags = read_scalars(os.path.join(tmp_path, "sd", "tensorboard"))
    for tag in ("boundary/feature_change_at_boundary", "boundary/feature_change_after_next_task",
                "boundary/q_jump_median", "boundary/v_norm_b_median", "magnitude/task_0"):
        assert tag in tags, (tag, sorted(tags))
    # a frozen backbone cannot move its features; a function-preserving freeze does not at the boundary
    lp = _run(digits_index, tmp_path, "lp", method="linear_probe")["boundaries"]
    assert all(r["feature_change_at_boundary"] == 0.0 and r["feature_change_after_next_task"] == 0.0 for r in lp)
    assert all("adapters" not in r for r in lp)
    cont = _run(digits_index, tmp_path, "cont", adapter={"rank": 4, "freeze": "continuous"})["boundaries"]
    assert all(r["feature_change_at_boundary"] < 1e-5 < r["feature_change_after_next_task"] for r in cont)
    assert not math.isclose(b[0]["feature_change_at_boundary"], cont[0]["feature_change_at_boundary"])


def test_diagnose_prints_a_runs_boundaries(tmp_path, capsys):
    from sdlora_ds.cli import diagnose
    rec = BoundaryRecorder()
    rec.task_end(0, torch.ones(2, 3))
    rec.task_start(1, torch.ones(2, 3) * 1.5)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"boundaries": rec.records}))
    assert diagnose.main(["--run", str(run), "--boundaries-only"]) == 0
    out = capsys.readouterr().out
    assert "boundary 0 -> 1: CLS feature change at the boundary 0.5000" in out
    assert diagnose.main(["--run", str(tmp_path / "nowhere"), "--boundaries-only"]) == 2
    assert "results.json not found" in capsys.readouterr().err


def _long_records(n: int) -> list:
    groups = ("q", "v")
    return [{"task": i, "feature_change_at_boundary": 0.01 * i, "feature_change_after_next_task": 0.5,
             "m_end": [1.0] * (i + 2),
             "adapters": {g: {m: {"min": 0.5, "median": 1.0, "max": 2.0 + i} for m in METRICS} for g in groups}}
            for i in range(n)]


def test_the_summary_of_hundreds_of_boundaries_stays_one_screen():
    """199 boundaries (T = 200): a summary over all of them (min/median/max, where the largest
    feature change is) and the first and last two in full, magnitude lists cut to their ends."""
    text = format_boundaries(_long_records(199))
    lines = text.splitlines()
    assert len(lines) <= 25 and max(map(len, lines)) < 200, text
    assert lines[0].startswith("199 boundaries")
    assert "CLS feature change at the boundary: 0.0000/0.9900/1.9800 (max at boundary 198 -> 199)" in text
    assert "q: norm_b 0.5/1/200" in text  # the max over every boundary's max
    shown = [ln.split(":")[0] for ln in lines if ln.startswith("boundary ")]
    assert shown == ["boundary 0 -> 1", "boundary 1 -> 2", "boundary 197 -> 198", "boundary 198 -> 199"]
    assert "... (189 more) ..." in text
    few = format_boundaries(_long_records(3))  # a short run: every record in full, as before
    assert [ln for ln in few.splitlines() if ln.startswith("boundary ")] == \
        ["boundary 0 -> 1: CLS feature change at the boundary 0.0000, after the next task 0.5000",
         "boundary 1 -> 2: CLS feature change at the boundary 0.0100, after the next task 0.5000",
         "boundary 2 -> 3: CLS feature change at the boundary 0.0200, after the next task 0.5000"]
