"""gpu_check's report: the targets judged from the figures, gpu_check.json, gpu_check.md and the
last line (standard library and sdlora_ds.fileio only). Every reader tolerates a part without a result."""
from __future__ import annotations

import json
import os

from sdlora_ds.fileio import atomic_write_bytes


def result_of(report: dict, name: str) -> dict:
    """A part's result dict, {} when the part failed before producing one (result None) or did not run."""
    r = (report.get("parts", {}).get(name) or {}).get("result")
    return r if isinstance(r, dict) else {}


def save_report(report: dict, out: str) -> None:
    """gpu_check.json, then gpu_check.md; each is written even if the other cannot be."""
    try:
        report["device"] = result_of(report, "env").get("device")
        report["targets"] = targets(report)
    except Exception as exc:  # noqa: BLE001 - recorded; the raw parts are still written
        report["targets"] = [{"target": "(could not be evaluated)", "goal": "", "measured": None, "met": None,
                              "note": f"{type(exc).__name__}: {exc}"}]
    atomic_write_bytes(os.path.join(out, "gpu_check.json"), json.dumps(report, indent=1, default=str).encode())
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("\n".join(markdown(report)) + "\n")


def summary_line(report: dict, out: str) -> str:
    """The last line printed: every failed part with its error, and where the report is."""
    parts = report["parts"]
    failed = [f"{n} ({(r.get('error') or '').splitlines()[0][:200] if r.get('error') else 'no error text'})"
              for n, r in parts.items() if r["status"] == "fail"]
    where = f"report: {os.path.join(out, 'gpu_check.json')} and gpu_check.md"
    if failed:
        return f"gpu_check: FAILED {len(failed)} of {len(parts)} part(s) in {report.get('total_s')} s: " \
               f"{'; '.join(failed)} | {where}"
    return f"gpu_check: {len(parts)} part(s) passed or skipped in {report.get('total_s')} s | {where}"


def targets(report: dict) -> list:
    """The issue's targets against what was measured (not evaluated in cpu-smoke mode)."""
    step = result_of(report, "step_timing").get("per_t") or {}
    t20 = step.get("20") or step.get(20) or {}
    e2e = result_of(report, "e2e_train")
    rows = [("step(T=20) / frozen step", "<= 1.05", t20.get("ours_over_frozen"), lambda v: v <= 1.05),
            ("per-task loop / ours at T=20", ">= 2", t20.get("loop_over_ours"), lambda v: v >= 2),
            ("ViT-B/16 bf16 img/s, step on a fixed batch (T=20)", ">= 4500", t20.get("ours_img_s"), lambda v: v >= 4500),
            ("ViT-B/16 bf16 img/s, end-to-end 2-task run", ">= 4500", e2e.get("img_s_steady"), lambda v: v >= 4500)]
    smoke = report["mode"] == "cpu-smoke"
    return [{"target": n, "goal": g, "measured": v,
             "met": None if (smoke or v is None) else bool(ok(v)),
             "note": "not evaluated: cpu-smoke (tiny shapes, no GPU)" if smoke else
             ("not measured (part failed or skipped)" if v is None else "")} for n, g, v, ok in rows]


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else str(v))


def markdown(report: dict) -> list:
    """gpu_check.md's lines. Each section is rendered on its own: one that cannot be (a partial
    result) is replaced by a line saying why, and the others are still written."""
    md = []
    for section in (_md_parts, _md_targets, _md_kernel_compile, _md_kernel_correctness, _md_step, _md_op,
                    _md_throughput):
        try:
            md += section(report)
        except Exception as exc:  # noqa: BLE001 - the JSON holds the raw figures anyway
            md += ["", f"({section.__name__[4:]} section not rendered: {type(exc).__name__}: {exc})"]
    return md


def _md_parts(report: dict) -> list:
    p = report["parts"]
    env = result_of(report, "env")
    md = [f"# gpu_check ({report['mode']})", "",
          f"Device: {report.get('device') or '-'}; torch {env.get('torch', '-')}, triton {env.get('triton', '-')}; "
          f"started {report['started_utc']}; total {report.get('total_s')} s of a {report['total_budget_s']} s budget.",
          "", "| part | status | seconds | budget s | estimate s | note |", "|---|---|---|---|---|---|"]
    for name, r in p.items():
        note = (r.get("error") or r.get("reason") or "").replace("|", "/")[:300]
        skipped = result_of(report, name).get("skipped_variants")
        if skipped:
            note = (note + " " if note else "") + "skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())
        md.append(f"| {name} | {r['status']} | {_fmt(r.get('seconds'))} | {r['budget_s']} | {r['estimate_s']} | {note} |")
    return md


def _md_targets(report: dict) -> list:
    md = ["", "## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in report.get("targets") or []:
        met = t["note"] if t["met"] is None else ("yes" if t["met"] else "**no**")
        md.append(f"| {t['target']} | {t['goal']} | {_fmt(t['measured'])} | {met} |")
    return md


def _md_kernel_compile(report: dict) -> list:
    kc = result_of(report, "kernel_compile")
    return ["", "## Kernels compiled by Triton's ptxas (registers, spills, shared memory)", "", kc["table"]] \
        if kc.get("table") else []


def _md_kernel_correctness(report: dict) -> list:
    md = []
    kc = result_of(report, "kernel_correctness").get("checks")
    if kc:
        md += ["", "## Kernel correctness (Triton vs reference, max |diff| / max |reference|)", "",
               "| compute / weights | passed | max rel diff | worst tensor | tolerance |", "|---|---|---|---|---|"]
        for k, r in kc.items():
            md.append(f"| {k} | {r['passed']} | {_fmt(r['max_rel_diff'])} | {r['worst']} | {r['tolerance']:.0e} |")
    return md


def _md_step(report: dict) -> list:
    md = []
    st = result_of(report, "step_timing")
    if st:
        md += ["", f"## Training step (ViT d={st['d']} x {st['layers']}, {st['image']} px, batch {st['batch']}, "
               f"amp {st['amp']}; ms, {st['stat']}; ours = {st['ours']}; frozen {_fmt(st['ms'].get('frozen'))} ms)", "",
               "| T | ours | reference impl | loop | ours/frozen | reference/frozen | loop/ours | triton/reference "
               "| ours/ours(T1) | img/s | peak MiB ours | peak MiB loop |", "|---" * 12 + "|"]
        for t, r in st["per_t"].items():
            md.append(f"| {t} | {_fmt(r.get('ours_ms'))} | {_fmt(r.get('ours_reference_ms'))} | {_fmt(r.get('loop_ms'))} "
                      f"| {_fmt(r.get('ours_over_frozen'))} | {_fmt(r.get('reference_over_frozen'))} "
                      f"| {_fmt(r.get('loop_over_ours'))} "
                      f"| {_fmt(r.get('triton_over_reference'))} | {_fmt(r.get('ours_over_ours_t1'))} "
                      f"| {_fmt(r.get('ours_img_s'))} | {_fmt(r.get('peak_mib_ours'))} | {_fmt(r.get('peak_mib_loop'))} |")
        for k, v in st.get("variant_failures", {}).items():
            md.append(f"\nvariant {k} failed: {v}")
    return md


def _md_op(report: dict) -> list:
    md = []
    op = result_of(report, "op_timing")
    if op:
        md += ["", f"## Stacked low-rank op ({op['tokens']} x {op['d']}, rank {op['rank']}, {op['dtype']}; ms)", "",
               "| T | plain | ours | reference impl | loop | ours/plain | loop/ours | triton/reference |",
               "|---|---|---|---|---|---|---|---|"]
        for t, r in op["per_t"].items():
            md.append(f"| {t} | {_fmt(r['plain_ms'])} | {_fmt(r['ours_ms'])} | {_fmt(r['ours_reference_ms'])} "
                      f"| {_fmt(r['loop_ms'])} | {_fmt(r['ours_over_plain'])} | {_fmt(r['loop_over_ours'])} "
                      f"| {_fmt(r['triton_over_reference'])} |")
    return md


def _md_throughput(report: dict) -> list:
    md = []
    rows = []
    e2e = result_of(report, "e2e_train")
    if e2e:
        rows.append(f"| e2e 2-task run (accelerate) | {_fmt(e2e.get('img_s_steady'))} steady, "
                    f"{_fmt(e2e.get('img_s_task_wall'))} incl. set-up/eval | {_fmt(e2e.get('wall_s'))} s wall |")
    ds = result_of(report, "data_shards")
    if ds:
        rows.append(f"| shard loader on that folder | {_fmt(ds['img_s'])} ({ds['workers']} workers) | |")
    for dev in ("cuda", "cpu"):
        r = result_of(report, f"data_bench_{dev}")
        if r:
            figures = {k: v for k, v in r["result"].items() if "ips" in k or "img_s" in k or "_over_" in k}
            rows.append(f"| bench/data_throughput.py --device {dev} | "
                        f"{', '.join(f'{k} {v}' for k, v in figures.items())} | |")
    if rows:
        md += ["", "## Throughput (img/s)", "", "| what | img/s | note |", "|---|---|---|", *rows]
    return md
