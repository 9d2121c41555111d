"""bench/zero_memory_full.py without running a cell: the plan each cell is compared with, the memory
gate that refuses a cell the machine cannot hold, and the table's ratios to one process (the cells
themselves run in bench/, minutes each; tests/test_zero_memory.py runs zero_memory.py itself)."""
import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import zero_memory_full as zf  # noqa: E402

MiB = 1 << 20


def test_plan_of_a_cell_is_the_configs_plan_in_fp32_at_one_image_per_rank():
    from sdlora_ds.config import load_config
    from sdlora_ds.plan import Setting, make_plan
    cfg = load_config(os.path.join(ROOT, "configs", "imagenetr_b40_dinov2_g14.json"), zf.plan_overrides(56, 4))
    assert cfg.dist.mixed_precision == "no" and cfg.data.image_size == 56 and cfg.backbone.image_size == 56
    direct = make_plan(cfg, Setting(num_processes=4, zero_stage=3))
    cell = zf.plan_of("dinov2_g14", 3, 4)
    assert cell["total"] == direct.total and cell["frozen parameters"] == direct.rows["frozen parameters"]
    # fp32 ZeRO-3: the frozen backbone (1.13B parameters, 4 B each) split over 4 ranks
    assert 0.24 < cell["frozen parameters"] / (4 * direct.arch.params) < 0.26
    assert zf.plan_of("dinov2_g14", 2, 4)["frozen parameters"] == 4 * direct.arch.params  # ZeRO-2 keeps it whole


def test_a_cell_that_does_not_fit_is_recorded_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(zf, "mem_available", lambda: 8 << 30)
    monkeypatch.setattr(zf, "run_cell", lambda *a: (_ for _ in ()).throw(AssertionError("must not run")))
    out = str(tmp_path / "cells.jsonl")
    zf.sweep(["dinov2_g14"], [2], [4], out, margin_gib=3.0)
    (rec,) = zf.read(out)
    assert rec["status"] == "not run" and rec["estimate"] > 4 * 4 * 1_100_000_000  # four whole fp32 copies
    assert "not run: needs ~" in zf.table([rec])
    zf.sweep(["dinov2_g14"], [2], [4], out, margin_gib=3.0)  # a re-run skips what the file holds
    assert len(zf.read(out)) == 1


def fake(world, params, peak, gathered=0):
    rank = {"params": params * MiB, "grads": MiB, "optimizer": MiB, "peak": peak * MiB, "resident": params * MiB,
            "step_peak": (peak - params) * MiB, "gathered_at_peak": gathered * MiB, "buffers": 0, "max_rss": 900 * MiB}
    return {"backbone": "vit_b16", "stage": 3, "world": world, "status": "run", "ranks": [rank] * world,
            "plan": {"total": 2 * peak * MiB}, "estimate": 0, "available": 0}


def test_table_gives_each_figure_and_its_ratio_to_one_process(monkeypatch):
    # the table asks today's plan for each cell: here, the plan the fake records carry
    plans = {1: fake(1, 400, 500)["plan"], 2: fake(2, 200, 300)["plan"]}  # by world
    monkeypatch.setattr(zf, "plan_of", lambda backbone, stage, world, *a, **k: plans[world])
    rows = zf.table([fake(1, 400, 500), fake(2, 200, 300, gathered=9)]).splitlines()
    assert len(rows) == 4
    two = rows[-1]
    assert "200.0 (0.500x)" in two and "300.0 (0.600x)" in two and "2.00 (1.000x)" in two
    assert "9.0 / 91.0" in two and two.endswith("| 0.50 |")
    json.dumps(zf.cell_figures(fake(4, 100, 150)))  # plain numbers: the records stay JSON
    mixed = fake(2, 200, 300, gathered=9)
    mixed["ranks"] = [mixed["ranks"][0], {**mixed["ranks"][0], "peak": 301 * MiB, "step_peak": 101 * MiB,
                                          "gathered_at_peak": 0}]
    assert "0.0 / 101.0" in zf.table([mixed])  # the peak's parts are those of the rank with the largest peak


def test_estimate_counts_zero3_gathering_whole_model_unless_bounded():
    plan = zf.plan_of("vit_l16", 3, 4)
    params = plan["backbone params"]
    one = zf.estimate(zf.plan_of("vit_l16", 3, 1), 1, 3, params, bounded=False)
    assert one == int(zf.plan_of("vit_l16", 3, 1)["total"] + zf.RUNTIME_GIB * zf.GiB)  # one rank gathers nothing
    free = zf.estimate(plan, 4, 3, params, bounded=False)
    bounded = zf.estimate(plan, 4, 3, params, bounded=True)
    assert free - bounded == 4 * (2 * 4 * params - 2 * plan["gathered layers + prefetch"])


def test_table_marks_max_rss_of_cells_run_with_a_fixed_mmap_threshold(monkeypatch):
    monkeypatch.setattr(zf, "plan_of", lambda *a, **k: {"total": MiB})
    rec = {**fake(1, 400, 500), "malloc_mmap_threshold": 1048576}
    assert "900 (mmap 1,048,576) |" in zf.table([rec]) and "(mmap" not in zf.table([fake(1, 400, 500)])
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert zf.malloc_env() == {"malloc_mmap_threshold": 1048576}
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert zf.malloc_env() == {}


RESULTS = os.path.join(ROOT, "bench", "results", "zero_memory_full.jsonl")


def test_plan_total_against_the_measured_peak_of_each_committed_cell():
    """The issue asks the plan to agree with the measured peak within 20 %. From the committed cells
    (nothing is run here), each against today's plan for its setting and its own prefetch bucket
    (peak / plan):
    - ZeRO-2, one process, and ZeRO-3 gathering one module at a time (bucket 0 + reuse 0): within 20 %,
      except ViT-B on 2 and 4 processes, where the plan is short by 22 % and 29 % (a small model: the
      fixed parts of the step weigh more);
    - ZeRO-3 with a prefetch bucket on several processes: the forward's gathered layers stay until their
      backward (reuse distance 0 or DeepSpeed's 1G alike); the plan counts the backbone twice there and
      is an upper bound: 0.84-0.86 for ViT-B, 0.67-0.70 for ViT-L (which gathers nearly all of it)."""
    cells = [r for r in zf.read(RESULTS) if r["status"] == "run"]
    assert len(cells) >= 26
    ratio = {}
    for r in cells:
        bucket = r.get("prefetch_bucket") if r["stage"] == 3 else None
        plan = zf.plan_of(r["backbone"], r["stage"], r["world"], prefetch_bucket=bucket)
        ratio[(r["backbone"], r["stage"], r["world"], zf.ds_of(r))] = zf.cell_figures(r)["peak"] / plan["total"]
    short = {k for k, v in ratio.items() if v > 1.2}
    assert short == {("vit_b16", 3, 2, (0, 0)), ("vit_b16", 3, 4, (0, 0))}, ratio
    assert max(ratio.values()) < 1.3, ratio
    retained = {k: v for k, v in ratio.items() if k[1] == 3 and k[2] > 1 and k[3][0]}
    assert retained and all(0.6 < v <= 1.0 for v in retained.values()), retained  # an upper bound
    rest = {k: v for k, v in ratio.items() if k not in retained}
    assert all(v >= 0.8 for v in rest.values()), rest
