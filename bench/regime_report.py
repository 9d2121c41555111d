"""Tables and plots of the regime benchmark (bench/regime.py) from its runs' results.json files.

    python bench/regime_report.py [--runs runs/regime] [--out docs/regime]

Writes into --out:
- report.md, summary.json, seen_accuracy.png, acc_matrix_*.png: sdlora_ds/report.py over the
  `compare` runs (mean ± std over seeds, paired gap-vs-spread test against the best method);
- boundaries.md + boundaries.png: per method, per boundary, mean over seeds of the median jump
  factor (q and v projections), median ||B||_F, and the CLS-feature change of the task-0 probe at the
  boundary and after the next task;
- steps.md + steps.png: SD-LoRA and sequential LoRA at 40 / 150 / 300 optimizer steps per task
  (seed 1993): Avg and Last Acc, and SD-LoRA's median jump factor, against the budget;
- select.md: the budget-selection runs (joint and linear probe only);
- regime.json: every number above. Ends with one JSON line.
Groups or runs that have not finished are listed as missing, not guessed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


from regime import METHODS, SEEDS, SELECT
from sdlora_ds.report import _figure, write_report

STEP_BUDGETS = {40: "steps40_{m}", 150: "{m}", 300: "steps300_{m}"}  # steps per task -> group name pattern


def load(runs: str, group: str, seed: int):
    path = os.path.join(runs, f"{group}__s{seed}", "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def boundary_rows(res_by_seed: list) -> list:
    """Per boundary: means over seeds of the q/v median jump, median ||B||, feature changes."""
    rows = []
    n_b = min(len(r["boundaries"]) for r in res_by_seed)
    for b in range(n_b):
        recs = [r["boundaries"][b] for r in res_by_seed]
        row = {"boundary": f"{b}->{b + 1}",
               "feature_change_at_boundary": mean([x.get("feature_change_at_boundary") for x in recs]),
               "feature_change_after_next_task": mean([x.get("feature_change_after_next_task") for x in recs])}
        for g in ("q", "v"):
            if all("adapters" in x for x in recs):
                row[f"{g}_jump"] = mean([x["adapters"][g]["jump"]["median"] for x in recs])
                row[f"{g}_norm_b"] = mean([x["adapters"][g]["norm_b"]["median"] for x in recs])
                row[f"{g}_coef_before"] = mean([x["adapters"][g]["coef_before"]["median"] for x in recs])
        rows.append(row)
    return rows


def _f(v, fmt="{:.3g}"):
    return "—" if v is None else fmt.format(v)


def boundaries_section(runs: str, out: str) -> dict:
    data, missing = {}, []
    for group in METHODS:
        if group == "joint":
            continue
        res = [r for r in (load(runs, group, s) for s in SEEDS) if r is not None]
        if not res:
            missing.append(group)
            continue
        data[group] = {"seeds": len(res), "rows": boundary_rows(res)}
    lines = ["# Task boundaries (mean over seeds)", "",
             "jump: the scalar on a just-finished direction's raw B A right after the freeze over right before "
             "(median over the 12 blocks, then mean over seeds); ||B||: median over blocks of the finished "
             "direction's ||B||_F; feature change: ||F_after - F_before|| / ||F_before|| of the CLS features of 32 "
             "test images of task 0's classes, from the end of task i to the start of task i+1 (the boundary alone) "
             "and to the end of task i+1.", "",
             "| method | seeds | boundary | q jump | v jump | q ‖B‖ | v ‖B‖ | m_i at the end | feature change at the "
             "boundary | after the next task |", "|---|---|---|---|---|---|---|---|---|---|"]
    for group, d in data.items():
        for row in d["rows"]:
            lines.append(f"| `{group}` | {d['seeds']} | {row['boundary']} | {_f(row.get('q_jump'))} | "
                         f"{_f(row.get('v_jump'))} | {_f(row.get('q_norm_b'))} | {_f(row.get('v_norm_b'))} | "
                         f"{_f(row.get('q_coef_before'))} | {_f(row['feature_change_at_boundary'], '{:.4f}')} | "
                         f"{_f(row['feature_change_after_next_task'], '{:.4f}')} |")
    if missing:
        lines += ["", "Not finished: " + ", ".join(missing)]
    with open(os.path.join(out, "boundaries.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig = _figure(11, 4, 110)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for group, d in data.items():
        xs = list(range(len(d["rows"])))
        if d["rows"] and "q_jump" in d["rows"][0]:
            ax1.plot(xs, [r["q_jump"] for r in d["rows"]], marker="o", label=f"{group} q")
            ax1.plot(xs, [r["v_jump"] for r in d["rows"]], marker="x", linestyle="--", label=f"{group} v")
        ax2.plot(xs, [r["feature_change_at_boundary"] for r in d["rows"]], marker="o", label=group)
    ax1.set_yscale("log"), ax1.set_xlabel("boundary i -> i+1"), ax1.set_ylabel("jump factor (median over blocks)")
    ax1.legend(fontsize=6)
    ax2.set_xlabel("boundary i -> i+1"), ax2.set_ylabel("CLS feature change at the boundary"), ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "boundaries.png"))
    return {"methods": data, "missing": missing}


def steps_section(runs: str, out: str) -> dict:
    table, missing = {}, []
    for m in ("sdlora", "seq_lora"):
        for steps, pattern in STEP_BUDGETS.items():
            r = load(runs, pattern.format(m=m), 1993)
            if r is None:
                missing.append(pattern.format(m=m))
                continue
            jumps = [(b["adapters"]["q"]["jump"]["median"], b["adapters"]["v"]["jump"]["median"])
                     for b in r["boundaries"] if "adapters" in b]
            table.setdefault(m, {})[steps] = {
                "avg_acc": r["avg_acc"], "last_acc": r["last_acc"], "forgetting": r["forgetting"],
                "diag_mean": mean([row[t] for t, row in enumerate(r["acc_matrix"])]),
                "q_jump": mean([j[0] for j in jumps]), "v_jump": mean([j[1] for j in jumps]),
                "feature_change_at_boundary": mean([b.get("feature_change_at_boundary") for b in r["boundaries"]]),
                "steps_per_task": len(r["loss_log"]) // len(r["acc_matrix"])}
    lines = ["# Steps per task (seed 1993)", "",
             "| method | steps/task | Avg Acc | Last Acc | forgetting | mean just-trained acc | q jump | v jump | "
             "feature change at boundaries |", "|---|---|---|---|---|---|---|---|---|"]
    for m, rows in table.items():
        for steps, r in sorted(rows.items()):
            lines.append(f"| {m} | {r['steps_per_task']} | {r['avg_acc']:.2f} | {r['last_acc']:.2f} | "
                         f"{r['forgetting']:.2f} | {r['diag_mean']:.2f} | {_f(r['q_jump'])} | {_f(r['v_jump'])} | "
                         f"{_f(r['feature_change_at_boundary'], '{:.4f}')} |")
    if missing:
        lines += ["", "Not finished: " + ", ".join(missing)]
    with open(os.path.join(out, "steps.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fig = _figure(11, 4, 110)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for m, rows in table.items():
        xs = sorted(rows)
        ax1.plot(xs, [rows[x]["last_acc"] for x in xs], marker="o", label=f"{m} Last Acc")
        ax1.plot(xs, [rows[x]["avg_acc"] for x in xs], marker="x", linestyle="--", label=f"{m} Avg Acc")
        if m == "sdlora":
            ax2.plot(xs, [rows[x]["q_jump"] for x in xs], marker="o", label="SD-LoRA q")
            ax2.plot(xs, [rows[x]["v_jump"] for x in xs], marker="x", label="SD-LoRA v")
    ax1.set_xlabel("optimizer steps per task"), ax1.set_ylabel("accuracy (%)"), ax1.legend(fontsize=7)
    ax2.set_xlabel("optimizer steps per task"), ax2.set_ylabel("jump factor (mean over boundaries)")
    ax2.set_yscale("log"), ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "steps.png"))
    return {"table": table, "missing": missing}


def select_section(runs: str, out: str) -> dict:
    rows = {}
    for group in SELECT:
        r = load(runs, group, 1993)
        rows[group] = None if r is None else {"last_acc": r["last_acc"], "avg_acc": r["avg_acc"],
                                              "train_seconds": sum(r["task_seconds"])}
    lines = ["# Budget selection (joint and linear probe only, seed 1993)", "", "| run | Avg Acc | Last Acc | "
             "train time (s) |", "|---|---|---|---|"]
    for g, r in rows.items():
        lines.append(f"| `{g}` | " + (" | ".join([f"{r['avg_acc']:.2f}", f"{r['last_acc']:.2f}",
                                                   f"{r['train_seconds']:.0f}"]) if r else "not finished | | ") + " |")
    with open(os.path.join(out, "select.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/regime")
    ap.add_argument("--out", default="docs/regime")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    compare = [os.path.join(a.runs, f"{g}__s{s}") for g in METHODS for s in SEEDS]
    done = [d for d in compare if os.path.isfile(os.path.join(d, "results.json"))]
    out = {"select": select_section(a.runs, a.out)}
    if done:
        out["compare"] = write_report(done, a.out)
    out["boundaries"] = boundaries_section(a.runs, a.out)
    out["steps"] = steps_section(a.runs, a.out)
    out["compare_runs_finished"] = f"{len(done)}/{len(compare)}"
    with open(os.path.join(a.out, "regime.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({"bench": "regime_report", "compare_runs_finished": out["compare_runs_finished"],
                      "out": a.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
