"""sdlora_ds.compare (the demo's closing table and the paired seed test) and bench/axis_report.py on
hand-made results.json files; the numbers are tests/test_report.py's, worked out by hand there."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from sdlora_ds.compare import main as compare_main
from sdlora_ds.compare import paired_gap, reading, table
from sdlora_ds.report import load_run
from test_report import RUNS, write_results

NCM = {1993: ([[80], [70, 60], [50, 50, 50]], [80, 65, 50]),  # forgetting ((80-50)+(60-50))/2 = 20
       1994: ([[80], [70, 60], [52, 50, 48]], [80, 65, 50]),
       1995: ([[80], [70, 60], [54, 50, 46]], [80, 65, 50])}

OLORA = {1993: ([[90], [70, 70], [35, 45, 55]], [90, 70, 45]),  # Last 45, 54: SD-LoRA (50, 52) minus them = 5, -2
         1994: ([[90], [70, 70], [44, 54, 64]], [90, 71, 54])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("axis")
    for (name, method), seeds in RUNS.items():
        for seed, (acc, acc_all) in seeds.items():
            write_results(root, f"axis300_{method}", method, seed, acc, acc_all)
    for seed, (acc, acc_all) in NCM.items():
        write_results(root, "axis_ncm", "ncm", seed, acc, acc_all)
    for seed, (acc, acc_all) in OLORA.items():  # a plug-in run on two of the three seeds
        write_results(root, "axis300_olora", "olora", seed, acc, acc_all)
    return str(root)


def test_paired_gap_by_hand():
    # Last Acc per seed 50/52/54 vs 40/46/52: diffs 10, 6, 2 -> mean 6, sample std 4, 3 positive, 6 < 2 x 4
    g = paired_gap({1993: 50, 1994: 52, 1995: 54}, {1993: 40, 1994: 46, 1995: 52, 1996: 0})
    assert g["seeds"] == [1993, 1994, 1995] and g["diffs"] == [10, 6, 2]
    assert g["mean"] == pytest.approx(6) and g["std"] == pytest.approx(4) and g["positive"] == 3
    assert g["separated"] is False
    assert paired_gap({1: 3.0, 2: 3.2}, {1: 1.0, 2: 1.0})["separated"] is True  # 2.1 > 2 x 0.14
    assert paired_gap({1: 1.0}, {1: 3.0})["separated"] is None  # one seed: nothing to test
    with pytest.raises(ValueError, match="no seed in common"):
        paired_gap({1: 1.0}, {2: 1.0})


def test_table_and_reading_from_the_numbers(runs):
    sd, seq, ncm = (load_run(os.path.join(runs, f"{g}__s1993", "results.json"))
                    for g in ("axis300_sdlora", "axis300_seq_lora", "axis_ncm"))
    text = table([sd, seq, ncm]).splitlines()
    # SD-LoRA seed 1993: Avg 71.67, Last 50, forgetting 35, diagonal (90 + 70 + 60) / 3 = 73.33
    assert text[2].split() == ["SD-LoRA", "71.67", "50.00", "35.00", "73.33"]
    assert text[3].split() == ["seq.", "LoRA", "66.67", "40.00", "45.00", "70.00"]
    assert text[4].split() == ["NCM", "65.00", "50.00", "20.00", "63.33"]
    line = reading([sd, seq, ncm])
    assert line.startswith("SD-LoRA keeps 10.0 points more of the old tasks than seq. LoRA (forgetting 35.0 vs 45.0) "
                           "and ends 10.0 points above it in Last Acc;")
    assert "forgets 15.0 points more of the old tasks than NCM (forgetting 35.0 vs 20.0) and ends 0.0 points above" in line


def test_axis_report_and_the_demo_printout(runs, tmp_path, capsys):
    out = str(tmp_path / "report")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "axis_report.py"), "--runs", runs, "--out", out],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    summary = json.load(open(os.path.join(out, "axis.json")))
    s = summary["steps"]["300"]
    assert s["n_seeds"] == 3 and set(s["methods"]) == {"sdlora", "seq_lora", "ncm", "olora"}  # SD-LoRA's seeds
    assert s["methods"]["sdlora"]["last_acc"] == pytest.approx([52, 2])
    assert s["methods"]["seq_lora"]["just_trained"][0] == pytest.approx((70 + 72 + 74) / 3)  # diagonals 70, 72, 74
    gap = s["paired"]["SD-LoRA - seq. LoRA"]
    assert (gap["mean"], gap["std"], gap["positive"], gap["separated"]) == (pytest.approx(6), pytest.approx(4), 3, False)
    assert s["paired"]["SD-LoRA - NCM"]["diffs"] == pytest.approx([0, 2, 4])
    olora = s["paired"]["SD-LoRA - O-LoRA"]  # over the two seeds both have: diffs 5, -2
    assert olora["seeds"] == [1993, 1994] and olora["mean"] == pytest.approx(1.5) and olora["positive"] == 1
    assert list(s["paired"])[:2] == ["SD-LoRA - seq. LoRA", "SD-LoRA - NCM"]
    md = open(os.path.join(out, "axis.md")).read()
    assert "| 1995 | 54.00 | 52.00 | 50.00 | — |" in md  # every method's Last Acc per seed: O-LoRA not run on 1995
    assert os.path.getsize(os.path.join(out, "axis.png")) > 1000 and "| 300 | 1994 | 52.00 | 46.00 | 50.00 |" in \
        open(os.path.join(out, "axis.md")).read()
    dirs = [os.path.join(runs, f"{g}__s1993") for g in ("axis300_sdlora", "axis300_seq_lora", "axis_ncm")]
    assert compare_main(dirs + ["--seeds", os.path.join(out, "axis.json")]) == 0
    printed = capsys.readouterr().out
    assert "Over 3 seeds of this setting" in printed
    assert "SD-LoRA - seq. LoRA, Last Acc per seed: +6.00 ± 4.00 points, positive in 3/3 seeds, beyond 2 std: no" in printed
    assert compare_main([str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_axis_report_fills_in_from_an_earlier_report_and_checks_what_was_rerun(runs, tmp_path):
    """--previous: an earlier axis.json (here the full 300-step report) supplies the (method, seed)
    records with no run; a rerun seed is compared with its earlier record (equal, or the difference)."""
    def report(runs_dir, out, *extra):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "axis_report.py"), "--runs", runs_dir,
                            "--out", out, "--measured-by", "fresh runs", *extra],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        return json.load(open(os.path.join(out, "axis.json")))
    earlier = str(tmp_path / "earlier")
    before = report(runs, earlier)
    new = tmp_path / "new"  # a 150-step axis, and seed 1993 of the 300 steps rerun: SD-LoRA equal, seq. LoRA not
    for (name, method), seeds in RUNS.items():
        for seed, (acc, acc_all) in seeds.items():
            write_results(new, f"axis150_{method}", method, seed, acc, acc_all)
    acc, acc_all = RUNS[("sdl", "sdlora")][1993]
    write_results(new, "axis300_sdlora", "sdlora", 1993, acc, acc_all)
    acc, acc_all = RUNS[("seq", "seq_lora")][1993]
    write_results(new, "axis300_seq_lora", "seq_lora", 1993, acc[:2] + [[30, 40, 51]], acc_all[:2] + [40 + 1 / 3])
    for seed, (acc, acc_all) in NCM.items():
        write_results(new, "axis_ncm", "ncm", seed, acc, acc_all)
    merged = report(str(new), str(tmp_path / "merged"), "--previous", os.path.join(earlier, "axis.json"))
    assert list(merged["steps"]) == ["150", "300"] and merged["previous"]["measured_by"] == before["measured_by"]
    s = merged["steps"]["300"]
    assert s["from_previous"] == {"sdlora": [1994, 1995], "seq_lora": [1994, 1995], "olora": [1993, 1994]}
    rep = {r["method"]: r for r in s["reproduced"]}
    assert rep["sdlora"]["equal"] is True and rep["ncm"]["equal"] is True
    assert rep["seq_lora"]["equal"] is False and rep["seq_lora"]["max_abs_diff"] == pytest.approx(1 / 3)
    b = before["steps"]["300"]  # the rerun's numbers are used, the rest are the earlier ones
    assert s["methods"]["sdlora"]["last_acc"] == pytest.approx(b["methods"]["sdlora"]["last_acc"])
    assert s["methods"]["seq_lora"]["per_seed"]["1993"]["last_acc"] == pytest.approx(40 + 1 / 3)
    assert s["paired"]["SD-LoRA - O-LoRA"]["seeds"] == [1993, 1994]
    assert "from_previous" not in merged["steps"]["150"] and merged["steps"]["150"]["n_seeds"] == 3
    md = open(os.path.join(tmp_path, "merged", "axis.md")).read()
    assert "- 300 steps, seq. LoRA: seeds 1994, 1995" in md
    assert "- reproduced: 300 steps, SD-LoRA, seed 1993: Avg/Last Acc and forgetting are equal to the earlier record" in md
    assert "seq. LoRA, seed 1993: Avg/Last Acc and forgetting differ by up to 0.3333 points from" in md
