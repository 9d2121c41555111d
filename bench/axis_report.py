"""The steps axis over seeds (bench/regime.py --stage axis): tables, the paired test, a plot.

    python bench/axis_report.py --runs runs/regime --out docs/regime/axis [--measured-by TEXT]
    python bench/axis_report.py --runs runs/demo_seeds --out docs/demo_compare

Reads every finished axis<steps>_<method>__s<seed> and axis_ncm__s<seed> run folder under --runs
and writes into --out:
- axis.json: per step count, per method, mean ± sample std of Avg Acc, Last Acc, forgetting and the
  mean just-trained accuracy (matrix diagonal), every seed's numbers, the paired test (per seed,
  SD-LoRA minus sequential LoRA and SD-LoRA minus NCM in Last Acc: mean, sample std, seeds positive,
  |mean| > 2 std) and SD-LoRA's median jump factor (q and v: median over seeds and boundaries of the
  per-boundary median over blocks). `launch/demo.sh` prints the demo setting's file.
- axis.md: the same as tables, plus one row per seed (where SD-LoRA does or does not lead: its Last Acc
  gap, task 0's accuracy at the end for both LoRA methods, the first boundary's jump and feature change).
- axis.png: Last Acc against steps per task, mean ± std with every seed as a dot, NCM as a band.
NCM has no training steps: its runs (once per seed) stand beside every step count. Runs that have not
finished are listed, not guessed. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys

from sdlora_ds.compare import diag_mean, paired_gap
from sdlora_ds.fileio import atomic_write_json
from sdlora_ds.report import _figure, load_run, mean_std, method_label

RUN = re.compile(r"^axis(\d+)?_(\w+?)__s(\d+)$")
FIRST = ("seq_lora", "ncm")  # SD-LoRA is paired with these first, then with every other method present


def pair_order(methods) -> list:
    """SD-LoRA minus each other method of a step count (the paired test's second members): sequential
    LoRA and NCM first (the demo's pairs), then the plug-ins and switches (olora, inflora, sdlora_rr, ...)
    in name order. Each pair uses the seeds both methods have (a switch run on one seed pairs on that seed)."""
    rest = sorted(m for m in methods if m not in FIRST and m != "sdlora")
    return [m for m in FIRST if m in methods] + rest


def collect(runs_dir: str) -> tuple[dict, list]:
    """{steps or None (NCM): {method: {seed: Run}}} and the unfinished folders."""
    found, unfinished = {}, []
    for name in sorted(os.listdir(runs_dir)):
        m = RUN.match(name)
        if not m:
            continue
        path = os.path.join(runs_dir, name, "results.json")
        if not os.path.isfile(path):
            unfinished.append(name)
            continue
        steps = int(m.group(1)) if m.group(1) else None
        found.setdefault(steps, {}).setdefault(m.group(2), {})[int(m.group(3))] = load_run(path)
    return found, unfinished


@functools.lru_cache(maxsize=None)
def boundaries(path: str) -> list:
    """results.json's boundary records (load_run's Run does not keep them), read once per run."""
    with open(path) as f:
        return json.load(f).get("boundaries") or []


def _jumps(run, proj: str) -> list:
    return [b["adapters"][proj]["jump"]["median"] for b in boundaries(run.path) if "adapters" in b]


def run_record(r) -> dict:
    """The per-seed numbers the report uses, from one finished run."""
    return {"avg_acc": r.scores["avg_acc"], "last_acc": r.scores["last_acc"], "forgetting": r.scores["forgetting"],
            "just_trained": diag_mean(r.acc), "task0_at_end": r.acc[-1][0]}


def method_stats(per: dict, label: str) -> dict:
    """per: {seed: run_record}. Mean ± sample std of every field over the seeds."""
    seeds = sorted(per)
    out = {"label": label, "seeds": seeds, "per_seed": {s: per[s] for s in seeds}}
    for k in ("avg_acc", "last_acc", "forgetting", "just_trained", "task0_at_end"):
        out[k] = list(mean_std([per[s][k] for s in seeds]))
    return out


def summarize(found: dict, previous: dict | None = None) -> dict:
    """Per step count: every method's stats, the paired tests, SD-LoRA's jumps. `previous` (an earlier
    axis.json's "steps") fills in the (method, seed) records that have no run here; where both exist,
    the run is used and its agreement with the earlier record is written under "reproduced"."""
    previous = previous or {}
    ncm = found.get(None, {}).get("ncm", {})
    table = {}
    for steps in sorted({k for k in found if k is not None} | {int(k) for k in previous}):
        runs = {**found.get(steps, {}), **({"ncm": ncm} if ncm else {})}
        prev = previous.get(str(steps), {})
        per, labels, from_prev, reproduced = {}, {}, {}, []
        for m, by_seed in runs.items():
            per[m] = {s: run_record(r) for s, r in by_seed.items()}
            labels[m] = method_label(next(iter(by_seed.values())).config)
        for m, pm in prev.get("methods", {}).items():
            labels.setdefault(m, pm["label"])
            for s_txt, rec in pm["per_seed"].items():
                s = int(s_txt)
                if s in per.get(m, {}):
                    diff = max(abs(per[m][s][k] - rec[k]) for k in ("avg_acc", "last_acc", "forgetting"))
                    reproduced.append({"method": m, "seed": s, "max_abs_diff": diff, "equal": diff == 0.0})
                else:
                    per.setdefault(m, {})[s] = rec
                    from_prev.setdefault(m, []).append(s)
        # SD-LoRA, sequential LoRA, NCM, then the plug-ins and switches by name
        order = (["sdlora"] if "sdlora" in per else []) + pair_order(per)
        methods = {m: method_stats(per[m], labels[m]) for m in order}
        paired = {}
        if "sdlora" in methods:
            for b in pair_order(methods):
                last = {m: {s: v["last_acc"] for s, v in methods[m]["per_seed"].items()} for m in ("sdlora", b)}
                if set(last["sdlora"]) & set(last[b]):
                    paired[f"{methods['sdlora']['label']} - {methods[b]['label']}"] = paired_gap(last["sdlora"], last[b])
        # the setting's seed count is SD-LoRA's (a switch run on one seed does not shrink it)
        n = len(methods["sdlora"]["seeds"]) if "sdlora" in methods else max(len(v["seeds"]) for v in methods.values())
        entry = {"n_seeds": n, "methods": methods, "paired": paired}
        sd = found.get(steps, {}).get("sdlora", {})
        # jumps over SD-LoRA's runs here; the earlier report's value when its seeds are not all here
        prev_sd = [int(s) for s in prev.get("methods", {}).get("sdlora", {}).get("per_seed", {})]
        if "sdlora_jump_median" in prev and not set(prev_sd) <= set(sd):
            entry["sdlora_jump_median"] = prev["sdlora_jump_median"]
        elif sd:
            entry["sdlora_jump_median"] = {p: statistics.median(j for r in sd.values() for j in _jumps(r, p))
                                           for p in ("q", "v") if any(_jumps(r, p) for r in sd.values())}
        first = {int(s): v for s, v in prev.get("first_boundary", {}).items()}
        first.update({s: _first_boundary(r) for s, r in sd.items()})
        if first:
            entry["first_boundary"] = dict(sorted(first.items()))
        if from_prev:
            entry["from_previous"] = from_prev
        if reproduced:
            entry["reproduced"] = reproduced
        table[str(steps)] = entry
    return table


def _first_boundary(run) -> dict:
    b = (boundaries(run.path) or [{}])[0]
    return {"q_jump": b.get("adapters", {}).get("q", {}).get("jump", {}).get("median"),
            "feature_change": b.get("feature_change_at_boundary")}


def _pm(v) -> str:
    return f"{v[0]:.2f} ± {v[1]:.2f}" if v[1] is not None else f"{v[0]:.2f}"


def markdown(summary: dict, unfinished: list) -> str:
    lines = [f"# Steps axis: {summary['setting']}", "", f"Measured by {summary['measured_by']}."]
    if summary.get("previous"):
        lines += ["", f"Records without a run here are from {summary['previous']['path']}, measured by "
                  f"{summary['previous']['measured_by']}:"]
        for steps, e in summary["steps"].items():
            for m, seeds in e.get("from_previous", {}).items():
                lines.append(f"- {steps} steps, {e['methods'][m]['label']}: seeds {', '.join(map(str, seeds))}")
    for steps, e in summary["steps"].items():
        for r in e.get("reproduced", []):
            what = "are equal to" if r["equal"] else f"differ by up to {r['max_abs_diff']:.4f} points from"
            lines.append(f"- reproduced: {steps} steps, {e['methods'][r['method']]['label']}, seed {r['seed']}: "
                         f"Avg/Last Acc and forgetting {what} the earlier record")
    lines += ["",
             "| steps/task | method | seeds | Avg Acc | Last Acc | forgetting | just-trained | task 0 at the end |",
             "|---|---|---|---|---|---|---|---|"]
    for steps, e in summary["steps"].items():
        for m in e["methods"].values():
            lines.append(f"| {steps} | {m['label']} | {len(m['seeds'])} | {_pm(m['avg_acc'])} | {_pm(m['last_acc'])} | "
                         f"{_pm(m['forgetting'])} | {_pm(m['just_trained'])} | {_pm(m['task0_at_end'])} |")
    lines += ["", "Paired test (Last Acc, per seed: first minus second):", "",
              "| steps/task | pair | mean | sample std | seeds positive | mean beyond 2 std | SD-LoRA jump q / v (median) |",
              "|---|---|---|---|---|---|---|"]
    for steps, e in summary["steps"].items():
        j = e.get("sdlora_jump_median", {})
        jtxt = f"{j['q']:.2f} / {j['v']:.2f}" if "q" in j and "v" in j else "—"
        for name, g in e["paired"].items():
            std = "—" if g["std"] is None else f"{g['std']:.2f}"
            sep = "—" if g["separated"] is None else ("yes" if g["separated"] else "no")
            lines.append(f"| {steps} | {name} | {g['mean']:+.2f} | {std} | {g['positive']}/{g['n']} | {sep} | {jtxt} |")
    lines += ["", "Per seed (SD-LoRA against sequential LoRA; task 0 = accuracy on the first task's classes after "
              "the last task; first boundary = SD-LoRA's median q jump and the CLS-feature change of task-0 images):",
              "", "| steps/task | seed | SD-LoRA Last | seq. LoRA Last | NCM Last | SD-LoRA task 0 | seq. LoRA task 0 | "
              "first boundary q jump | feature change |", "|---|---|---|---|---|---|---|---|---|"]
    for steps, e in summary["steps"].items():
        ms = e["methods"]
        if "sdlora" not in ms:
            continue
        for s in ms["sdlora"]["seeds"]:
            def cell(m, k):
                v = ms.get(m, {}).get("per_seed", {}).get(s)
                return "—" if v is None else f"{v[k]:.2f}"
            fb = e.get("first_boundary", {}).get(s, {})
            qj = "—" if fb.get("q_jump") is None else f"{fb['q_jump']:.2f}"
            fc = "—" if fb.get("feature_change") is None else f"{fb['feature_change']:.3f}"
            lines.append(f"| {steps} | {s} | {cell('sdlora', 'last_acc')} | {cell('seq_lora', 'last_acc')} | "
                         f"{cell('ncm', 'last_acc')} | {cell('sdlora', 'task0_at_end')} | "
                         f"{cell('seq_lora', 'task0_at_end')} | {qj} | {fc} |")
    lines += ["", "Last Acc per seed, every method run at that step count (— : not run on that seed):", ""]
    for steps, e in summary["steps"].items():
        ms = e["methods"]
        seeds = sorted({s for m in ms.values() for s in m["seeds"]})
        lines += [f"| {steps} steps | " + " | ".join(m["label"] for m in ms.values()) + " |",
                  "|---" * (len(ms) + 1) + "|"]
        for s in seeds:
            lines.append(f"| {s} | " + " | ".join("—" if s not in m["per_seed"] else f"{m['per_seed'][s]['last_acc']:.2f}"
                                                 for m in ms.values()) + " |")
        lines.append("")
    if unfinished:
        lines += ["", "Not finished: " + ", ".join(unfinished)]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    """Step counts as evenly spaced categories; the methods side by side within each (so one step
    count still shows both spreads)."""
    fig = _figure(6.5, 4, 110)
    ax = fig.add_subplot(1, 1, 1)
    steps = list(summary["steps"])
    for m, style, dx in (("sdlora", "o", -0.15), ("seq_lora", "s", -0.05), ("olora", "^", 0.05), ("inflora", "v", 0.15)):
        pts = [(i + dx, summary["steps"][k]["methods"].get(m)) for i, k in enumerate(steps)]
        pts = [(x, v) for x, v in pts if v]
        if not pts:
            continue
        ax.errorbar([x for x, _ in pts], [v["last_acc"][0] for _, v in pts], yerr=[v["last_acc"][1] or 0 for _, v in pts],
                    fmt=style + "-", capsize=4, label=f"{pts[0][1]['label']} (mean ± std; dots: seeds)")
        for x, v in pts:
            ax.scatter([x] * len(v["seeds"]), [v["per_seed"][s]["last_acc"] for s in v["seeds"]], s=12, alpha=0.5)
    ncm = next((e["methods"]["ncm"] for e in summary["steps"].values() if "ncm" in e["methods"]), None)
    if ncm:
        mu, sd = ncm["last_acc"][0], ncm["last_acc"][1] or 0
        ax.axhspan(mu - sd, mu + sd, color="grey", alpha=0.2)
        ax.axhline(mu, color="grey", linestyle=":", label="NCM (no training steps)")
    ax.set_xticks(range(len(steps)), steps)
    ax.set_xlim(-0.6, len(steps) - 0.4)
    ax.set_xlabel("optimizer steps per task"), ax.set_ylabel("Last Acc (%)"), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--previous", default=None, help="an earlier axis.json: its (method, seed) records fill in "
                    "what has no run under --runs; where both exist the run is used and compared with it")
    ap.add_argument("--measured-by", default="bench/regime.py --stage axis (one thread per run)",
                    help="how and at which commit the runs were made (printed with the numbers)")
    a = ap.parse_args(argv)
    found, unfinished = collect(a.runs)
    previous = None
    if a.previous:
        with open(a.previous) as f:
            previous = json.load(f)
    if not any(k is not None for k in found):
        print(f"error: no finished axis<steps>_<method>__s<seed> run under {a.runs}", file=sys.stderr)
        return 2
    any_run = next(r for steps, by_method in found.items() if steps is not None
                   for by_seed in by_method.values() for r in by_seed.values())
    cfg = any_run.config
    setting = f"{any_run.dataset}, {cfg['cil']['num_tasks']} tasks of {cfg['cil']['increment'] or cfg['cil']['init_classes']} classes"
    summary = {"setting": setting, "measured_by": a.measured_by, "steps": summarize(found, previous and previous["steps"]),
               "unfinished": unfinished}
    if previous:
        summary["previous"] = {"path": a.previous, "measured_by": previous["measured_by"]}
    os.makedirs(a.out, exist_ok=True)
    atomic_write_json(os.path.join(a.out, "axis.json"), summary)
    with open(os.path.join(a.out, "axis.md"), "w") as f:
        f.write(markdown(summary, unfinished))
    plot(summary, os.path.join(a.out, "axis.png"))
    print(json.dumps({"bench": "axis_report", "out": a.out, "step_counts": list(summary["steps"]),
                      "unfinished": len(unfinished)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
