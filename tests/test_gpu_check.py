"""bench/gpu_check.py on the CPU (--cpu-smoke): every part runs with tiny shapes or is skipped with
its reason, and the JSON + markdown outputs list every part. The GPU figures themselves need a GPU
(bash bench/gpu_check.sh on one); this checks the script that takes them."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check as G  # noqa: E402


def load(out):
    with open(os.path.join(out, "gpu_check.json")) as f:
        report = json.load(f)
    with open(os.path.join(out, "gpu_check.md")) as f:
        return report, f.read()


def test_cpu_smoke_runs_every_part_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out))
    env.pop("SDLORA_GPU_CHECK_CPU", None)
    # budgets x10: they are sized for a GPU machine, and a busy shared CPU imports torch in a minute
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--cpu-smoke", "--budget-s", "4000",
                           "--budget-scale", "10"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=4500)
    report, md = load(out)
    parts = report["parts"]
    assert list(parts) == list(G.PARTS), proc.stdout[-3000:]  # every part listed, in order
    for name, rec in parts.items():
        assert f"| {name} | {rec['status']} |" in md
        assert rec["status"] in ("pass", "fail", "skipped")
        if rec["status"] == "skipped":
            assert rec["reason"]
    # bench/data_throughput.py takes --device/--out-json (landed with the data issue): the part passes
    # with the JSON it wrote
    bench = parts["data_bench_cpu"]
    assert bench["status"] == "pass", bench.get("error")
    assert bench["result"]["result"]
    assert parts["data_bench_cuda"]["status"] == "skipped" and "CUDA" in parts["data_bench_cuda"]["reason"]
    others = [n for n in G.PARTS if n not in ("data_bench_cpu", "data_bench_cuda")]
    assert all(parts[n]["status"] == "pass" for n in others), {n: parts[n].get("error") for n in others}
    assert proc.returncode == 0

    kc = parts["kernel_correctness"]["result"]["checks"]  # ran under the interpreter, really compared
    assert set(kc) == {"float32/w_float32", "bfloat16/w_float32", "bfloat16/w_bfloat16"}
    assert all(r["passed"] and r["max_rel_diff"] is not None for r in kc.values())
    st = parts["step_timing"]["result"]
    assert st["skipped_variants"].keys() == {"ours_triton", "peak_memory"}
    for t in G.sizes(True)["tasks"]:
        row = st["per_t"][str(t)]
        assert row["ours_ms"] > 0 and row["loop_ms"] > 0 and row["ours_over_frozen"] > 0
    assert parts["op_timing"]["result"]["per_t"]["20"]["loop_over_ours"] > 0
    e2e = parts["e2e_train"]["result"]
    assert e2e["returncode"] == 0 and e2e["img_s_steady"] > 0 and len(e2e["task_seconds"]) == 2
    assert parts["data_shards"]["result"]["images"] == 4 * 12 and parts["data_shards"]["result"]["img_s"] > 0
    assert all(t["met"] is None and "cpu-smoke" in t["note"] for t in report["targets"])
    assert "## Targets" in md and "## Training step" in md and "## Kernel correctness" in md
    print(f"cpu smoke: {report['total_s']} s")  # < 60 s on an idle 2-core machine


def test_a_failing_part_does_not_stop_the_others(tmp_path):
    """data_shards without the shards part fails (no index); the next part still runs and is recorded."""
    out = tmp_path / "out"
    code = G.main(["--cpu-smoke", "--out", str(out), "--only", "data_shards,data_bench_cuda",
                   "--work", str(tmp_path / "work")])
    report, md = load(out)
    assert code == 1
    ds = report["parts"]["data_shards"]
    assert ds["status"] == "fail" and "no shard index" in ds["error"] and ds["traceback"]
    assert report["parts"]["data_bench_cuda"]["status"] == "skipped"
    assert "| data_shards | fail |" in md


def test_total_budget_skips_what_does_not_fit(tmp_path):
    out = tmp_path / "out"
    assert G.main(["--cpu-smoke", "--out", str(out), "--budget-s", "0", "--only", "env,step_timing"]) == 0
    report, _ = load(out)
    assert [r["status"] for r in report["parts"].values()] == ["skipped", "skipped"]
    assert all("budget" in r["reason"] for r in report["parts"].values())


def test_targets_are_judged_from_the_measured_ratios():
    report = {"mode": "gpu", "parts": {
        "step_timing": {"result": {"per_t": {"20": {"ours_over_frozen": 1.04, "loop_over_ours": 1.7,
                                                    "ours_img_s": 5000.0}}}},
        "e2e_train": {"status": "fail"}}}
    got = {t["target"]: t["met"] for t in G.targets(report)}
    assert list(got.values()) == [True, False, True, None]


def test_unknown_part_is_refused():
    with pytest.raises(SystemExit):
        G.main(["--only", "nope"])


def test_failing_parts_keep_the_report_and_the_others_run(tmp_path, monkeypatch, capsys):
    """env fails (result None: the orchestrator used to crash reading the device from it) and shards
    fails, both on purpose; op_timing still runs, data_shards is skipped with its reason, both files
    are written, the exit is 1 and the last line names each failed part with its error."""
    monkeypatch.setenv("SDLORA_GPU_CHECK_FAIL", "env,shards")
    out = tmp_path / "out"
    code = G.main(["--cpu-smoke", "--out", str(out), "--only", "env,op_timing,shards,data_shards",
                   "--work", str(tmp_path / "work")])
    report, md = load(out)
    parts = report["parts"]
    assert code == 1
    assert [parts[n]["status"] for n in ("env", "op_timing", "shards", "data_shards")] == \
        ["fail", "pass", "fail", "skipped"]
    for n in ("env", "shards"):
        assert "injected by SDLORA_GPU_CHECK_FAIL" in parts[n]["error"] and parts[n]["traceback"]
        assert f"| {n} | fail |" in md
    assert report["device"] is None and parts["op_timing"]["result"]["per_t"]
    assert "## Stacked low-rank op" in md  # the passing part's figures are in the markdown
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("gpu_check: FAILED 2 of 4 part(s)") and "env (RuntimeError: failure injected" in last
    assert "shards (RuntimeError" in last and str(out / "gpu_check.json") in last


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_env_fails_and_the_device_parts_are_skipped(tmp_path, capsys):
    """The issue's reproduction: `bash bench/gpu_check.sh` (no --cpu-smoke) on a machine without CUDA."""
    out = tmp_path / "out"
    code = G.main(["--out", str(out), "--only", "env,kernel_correctness,step_timing", "--work", str(tmp_path / "w"),
                   "--budget-scale", "20"])  # env imports torch, triton, deepspeed: slow on a busy CPU
    report, md = load(out)
    assert code == 1
    assert report["parts"]["env"]["status"] == "fail" and "no CUDA device" in report["parts"]["env"]["error"]
    for n in ("kernel_correctness", "step_timing"):
        assert report["parts"][n]["status"] == "skipped" and "no usable GPU" in report["parts"][n]["reason"]
    assert "| env | fail |" in md
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("gpu_check: FAILED 1 of 3 part(s)")


def test_a_section_that_cannot_be_rendered_does_not_lose_the_markdown():
    report = {"mode": "gpu", "started_utc": "-", "total_budget_s": 1, "targets": [], "parts": {
        "kernel_correctness": {"status": "fail", "budget_s": 1, "estimate_s": 1, "error": "boom",
                               "result": {"checks": {"float32/w_float32": {"passed": False}}}},  # partial record
        "op_timing": {"status": "fail", "budget_s": 1, "estimate_s": 1, "error": "x", "result": None}}}
    md = "\n".join(G.markdown(report))
    assert "| kernel_correctness | fail |" in md and "| op_timing | fail |" in md
    assert "(kernel_correctness section not rendered: KeyError" in md
