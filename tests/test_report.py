"""sdlora_ds.report / sdlora-report on hand-made results.json files (numbers worked out by hand)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, tiny_config_dict
from sdlora_ds import metrics as M
from sdlora_ds.config import config_from_dict, config_to_dict
from sdlora_ds.report import compare_to_best, find_results, group_runs, load_run, write_report

CIL3 = {"num_classes": 6, "init_classes": 2, "increment": 2, "num_tasks": 3}
# (accuracy matrix, acc_all) per seed. Hand computation, SD-LoRA ("sdl"):
#   Avg  (90+75+50)/3=71.67, 72.67, 73.67 -> 72.67 ± 1;  Last 50, 52, 54 -> 52 ± 2
#   forgetting ((90-40)+(70-50))/2=35, 32, 29 -> 32 ± 3;  BWT -35, -32, -29 -> -32 ± 3
# seq. LoRA ("seq"): Avg 66.67, 69, 71.33 -> 69 ± 2.33; Last 40, 46, 52 -> 46 ± 6;
#   forgetting ((90-30)+(70-40))/2=45, 39, 33 -> 39 ± 6; BWT -39 ± 6
#   paired gaps to sdl: Avg 5, 3.67, 2.33 -> 3.67, std 1.33 (> 2 std: yes); Last 10, 6, 2 -> 6, std 4 (no)
RUNS = {
    ("sdl", "sdlora"): {1993: ([[90], [80, 70], [40, 50, 60]], [90, 75, 50]),
                        1994: ([[90], [80, 70], [44, 52, 60]], [90, 76, 52]),
                        1995: ([[90], [80, 70], [48, 54, 60]], [90, 77, 54])},
    ("seq", "seq_lora"): {1993: ([[90], [70, 70], [30, 40, 50]], [90, 70, 40]),
                          1994: ([[90], [70, 70], [36, 46, 56]], [90, 71, 46]),
                          1995: ([[90], [70, 70], [42, 52, 62]], [90, 72, 52])},
}


def write_results(folder, name, method, seed, acc, acc_all, cil=CIL3, **cfg_over) -> str:
    """A results.json as the trainer writes it (the fields the report reads), in folder/name__s<seed>/."""
    raw = tiny_config_dict(name=f"{name}__s{seed}", method=method, seed=seed, output_dir=str(folder),
                           cil={**cil, "order_seed": seed}, **cfg_over)
    cfg = config_to_dict(config_from_dict(raw))
    run = os.path.join(folder, cfg["name"])
    os.makedirs(run, exist_ok=True)
    res = {"method": method, "dataset": "fake", **M.summarize(acc, acc_all), "task_seconds": [1.0] * len(acc),
           "config": cfg}
    path = os.path.join(run, "results.json")
    with open(path, "w") as f:
        json.dump(res, f)
    return path


def make_sweep(folder) -> str:
    for (name, method), seeds in RUNS.items():
        for seed, (acc, acc_all) in seeds.items():
            write_results(folder, name, method, seed, acc, acc_all)
    joint = {"num_classes": 6, "init_classes": 6, "increment": 0, "num_tasks": 1}
    for seed, v in ((1993, 85), (1994, 87)):
        write_results(folder, "joint", "sdlora", seed, [[v]], [v], cil=joint)
    for run in ("sdl__s1996", "sdl__s1996/checkpoints/step-00000004", "sdl__s1993/checkpoints/step-00000008"):
        os.makedirs(os.path.join(folder, run), exist_ok=True)  # s1996: unfinished (config.json, no results)
        open(os.path.join(folder, run, "config.json"), "w").write("{}")  # checkpoints have one too: not runs
    return str(folder)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    src = make_sweep(tmp_path_factory.mktemp("sweep"))
    out = str(tmp_path_factory.mktemp("report"))
    return src, write_report([src], out)


def test_table_matches_hand_computation(report):
    _, written = report
    md = open(written["markdown"]).read()
    assert ("| SD-LoRA | `sdl` | 3 | 1993, 1994, 1995 | 72.67 ± 1.00 | 52.00 ± 2.00 | 32.00 ± 3.00 | "
            "-32.00 ± 3.00 | best | best |") in md
    assert ("| seq. LoRA | `seq` | 3 | 1993, 1994, 1995 | 69.00 ± 2.33 | 46.00 ± 6.00 | 39.00 ± 6.00 | "
            "-39.00 ± 6.00 | -3.67 (paired std 1.33): yes | -6.00 (paired std 4.00): no |") in md
    assert ("| joint (upper bound) | `joint` | 2 | 1993, 1994 | 86.00 ± 1.41 | 86.00 ± 1.41 | 0.00 ± 0.00 | "
            "0.00 ± 0.00 | upper bound (not ranked) | upper bound (not ranked) |") in md
    assert md.index("`sdl`") < md.index("`seq`") < md.index("`joint`")  # input order, the upper bound last
    assert "sdl__s1996" in md and "Skipped 1 run folder" in md  # unfinished run named, not averaged
    assert "checkpoints" not in md
    s = json.load(open(written["summary"]))
    g = {x["name"]: x for x in s["groups"]}
    assert g["sdl"]["acc_all_mean"] == pytest.approx([90, 76, 52])
    assert s["gap_to_best"]["last_acc"]["seq"] == {"best": False, "gap": pytest.approx(6.0), "std": pytest.approx(4.0),
                                                   "paired": True, "separated": False}


def test_mean_matrix_in_markdown(report):
    md = open(report[1]["markdown"]).read()
    # sdl last row: tasks 0..2 = mean(40, 44, 48), mean(50, 52, 54), 60; all seen 52
    assert "      T2   44.00  52.00  60.00   52.00" in md


def _png(path):
    img = Image.open(path)
    img.load()
    return img.size, np.asarray(img.convert("RGB")).astype(np.float64)


def test_plots_exist_and_are_not_blank(report):
    _, written = report
    assert set(written["matrix_plots"]) == {"sdl", "seq"}  # no 1x1 heatmap for joint
    size, px = _png(written["seen_plot"])
    assert size[0] >= 500 and size[1] >= 300 and px.std() > 0
    blue = np.array([31, 119, 180])  # matplotlib C0: the first method's line
    assert (np.abs(px - blue).sum(-1) < 30).sum() > 50
    for path in written["matrix_plots"].values():
        size, px = _png(path)
        assert size[0] >= 300 and size[1] >= 200 and px.std() > 10


def test_unpaired_gap_when_seeds_differ(tmp_path):
    for seed, (acc, acc_all) in RUNS[("sdl", "sdlora")].items():
        write_results(tmp_path, "sdl", "sdlora", seed, acc, acc_all)
    for seed in (1993, 1994):  # seq with two seeds only: Last 40, 46 -> 43 ± 4.243
        acc, acc_all = RUNS[("seq", "seq_lora")][seed]
        write_results(tmp_path, "seq", "seq_lora", seed, acc, acc_all)
    groups = group_runs([load_run(p) for p in find_results([str(tmp_path)])[0]])
    c = compare_to_best(groups, "last_acc")["seq"]
    assert c["paired"] is False and c["gap"] == pytest.approx(9.0)
    assert c["std"] == pytest.approx(np.sqrt(2.0 ** 2 + 18.0)) and c["separated"] is False


def test_refuses_mixed_settings_duplicates_and_damaged_files(tmp_path):
    acc, acc_all = RUNS[("sdl", "sdlora")][1993]
    a = write_results(tmp_path / "a", "sdl", "sdlora", 1993, acc, acc_all)
    b = write_results(tmp_path / "b", "sdl", "sdlora", 1994, acc, acc_all, optim={"lr": 0.01})
    with pytest.raises(ValueError, match=r"differ in config field 'optim.lr'"):
        group_runs([load_run(a), load_run(b)])
    c = write_results(tmp_path / "c", "sdl", "sdlora", 1993, acc, acc_all)
    with pytest.raises(ValueError, match="two runs with seed 1993"):
        group_runs([load_run(a), load_run(c)])
    res = json.load(open(a))
    res["acc_matrix"], res["acc_all"] = res["acc_matrix"][:2], res["acc_all"][:2]
    json.dump(res, open(a, "w"))
    with pytest.raises(ValueError, match="did not finish"):
        load_run(a)
    res = json.load(open(c))
    res["last_acc"] = 99.0
    json.dump(res, open(c, "w"))
    with pytest.raises(ValueError, match="last_acc = 99.0 but its accuracy matrix gives 50"):
        load_run(c)


def test_cli(report, tmp_path):
    src, _ = report
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "sdlora_ds.cli.report", "--runs", src, "--out", str(out), "--band", "std",
                        "--label", "sdl=SD-LoRA (ours)"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert "| SD-LoRA (ours) | `sdl` |" in md and "mean ± 1 sample std" in md
    r = subprocess.run([sys.executable, "-m", "sdlora_ds.cli.report", "--runs", str(tmp_path / "none"), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_matrix_plot_of_hundreds_of_tasks_is_a_heat_map(tmp_path):
    """Above metrics.CELL_TEXT_MAX_TASKS tasks plot_matrix draws a fixed-size heat map without cell
    text (the per-cell figure of T = 200 would be ~180 x 120 inches)."""
    from sdlora_ds.report import Group, plot_matrix
    sizes = {}
    for T in (M.CELL_TEXT_MAX_TASKS, M.CELL_TEXT_MAX_TASKS + 1, 200):
        acc = np.full((T, T), np.nan)
        for t in range(T):
            acc[t, :t + 1] = 100.0 * (np.arange(t + 1) % 2)
        g = Group(name="g", label="SD-LoRA", runs=[None], acc_mean=acc,
                  all_curve={"mean": np.full(T, 20.0), "std": np.zeros(T)})
        plot_matrix(g, str(tmp_path / f"m{T}.png"))
        sizes[T], img = _png(str(tmp_path / f"m{T}.png"))
    assert sizes[200] == sizes[M.CELL_TEXT_MAX_TASKS + 1] == (1100, 880)  # 10 x 8 in at 110 dpi
    assert sizes[M.CELL_TEXT_MAX_TASKS][0] > 1100
    w, h = sizes[200]
    area = img[int(0.7 * h): int(0.8 * h), int(0.15 * w): int(0.35 * w)]  # below the diagonal
    # viridis: 0 % dark purple, 100 % yellow; no white/black digits in between
    yellow = (area[..., 0] > 200) & (area[..., 1] > 200) & (area[..., 2] < 100)
    assert yellow.mean() > 0.3 and ((area.sum(axis=2) > 700) | (area.sum(axis=2) < 30)).sum() == 0
