"""Methods side by side: the demo's closing table, its one-line reading, and the paired seed test.

    python -m sdlora_ds.compare RUN_DIR [RUN_DIR ...] [--seeds docs/demo_compare.json]

Each RUN_DIR is a finished run folder (its results.json); the first is the method the reading is
about (SD-LoRA in the demo), the others are what it is compared with. The table: method, Avg Acc,
Last Acc, forgetting (mean drop from each old task's best accuracy, as in results.json) and the mean
just-trained accuracy (the matrix diagonal: how well each task was learned when it was trained).
The reading line is computed from those numbers, never written in.

--seeds points at the multi-seed summary of the same setting (bench/axis_report.py writes it): it is
printed under the table so that a single run (one class order) is read beside the spread over seeds.

`paired_gap` is the project's paired seed test (also used by bench/axis_report.py): per seed, the
first method minus the second; mean, sample std, seeds positive, and whether |mean| > 2 std.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from sdlora_ds.report import Run, _pm, load_run, mean_std, method_label


def diag_mean(acc: Sequence[Sequence[float]]) -> float:
    """Mean accuracy on each task right after training it (the accuracy matrix's diagonal)."""
    return sum(row[t] for t, row in enumerate(acc)) / len(acc)


def paired_gap(a: dict, b: dict) -> dict:
    """Per seed a[s] - b[s] over the seeds both have: mean, sample std (None for one seed), how many
    seeds are positive, and `separated`: |mean| > 2 std (None when there is no spread to test)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common: the paired test needs the same seeds (class orders) for both methods")
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    mean, std = mean_std(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "std": std, "n": len(seeds),
            "positive": sum(d > 0 for d in diffs),
            "separated": None if std is None else bool(abs(mean) > 2 * std)}


def gap_text(g: dict) -> str:
    """'+5.31 ± 2.10 points, positive in 4/5 seeds, beyond 2 std: yes' (one seed: no spread)."""
    if g["std"] is None:
        return f"{g['mean']:+.2f} points (one seed: no spread)"
    return (f"{g['mean']:+.2f} ± {g['std']:.2f} points, positive in {g['positive']}/{g['n']} seeds, "
            f"beyond 2 std: {'yes' if g['separated'] else 'no'}")


def _row(run: Run) -> dict:
    return {"label": method_label(run.config), "avg_acc": run.scores["avg_acc"], "last_acc": run.scores["last_acc"],
            "forgetting": run.scores["forgetting"], "just_trained": diag_mean(run.acc)}


def table(runs: Sequence[Run]) -> str:
    rows = [_row(r) for r in runs]
    w = max(len("method"), *(len(r["label"]) for r in rows))
    head = f"{'method':<{w}}  {'Avg Acc':>7}  {'Last Acc':>8}  {'forgetting':>10}  {'just-trained':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<{w}}  {r['avg_acc']:>7.2f}  {r['last_acc']:>8.2f}  {r['forgetting']:>10.2f}  "
                     f"{r['just_trained']:>12.2f}")
    return "\n".join(lines)


def reading(runs: Sequence[Run]) -> str:
    """One line about the first run against each other one, from the numbers."""
    first, *others = [_row(r) for r in runs]
    parts = []
    for o in others:
        kept = o["forgetting"] - first["forgetting"]
        last = first["last_acc"] - o["last_acc"]
        if o["forgetting"] == 0 and first["forgetting"] == 0:
            parts.append(f"{last:+.1f} points of Last Acc against {o['label']}")
            continue
        parts.append(f"{'keeps' if kept >= 0 else 'forgets'} {abs(kept):.1f} points more of the old tasks than "
                     f"{o['label']} (forgetting {first['forgetting']:.1f} vs "
                     f"{o['forgetting']:.1f}) and ends {abs(last):.1f} points {'above' if last >= 0 else 'below'} it "
                     f"in Last Acc")
    return f"{first['label']} " + "; ".join(parts) + "."


def seeds_text(summary: dict, steps: Optional[int] = None) -> str:
    """The multi-seed block of a bench/axis_report.py summary at one step count (its only one by default)."""
    by_steps = summary["steps"]
    key = str(steps) if steps is not None else (next(iter(by_steps)) if len(by_steps) == 1 else None)
    if key not in by_steps:
        raise ValueError(f"the seeds summary has step counts {sorted(by_steps)}; pass one of them")
    s = by_steps[key]
    lines = [f"Over {s['n_seeds']} seed{'s' if s['n_seeds'] != 1 else ''} of this setting ({summary['setting']}, {key} steps per task; measured by "
             f"{summary['measured_by']}):"]
    for m in s["methods"].values():
        lines.append(f"  {m['label']:<16} Last Acc {_pm(*m['last_acc'])}, forgetting {_pm(*m['forgetting'])}, "
                     f"just-trained {_pm(*m['just_trained'])}")
    for name, g in s["paired"].items():
        lines.append(f"  {name}, Last Acc per seed: {gap_text(g)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished run folders; the first is the one the reading is about")
    ap.add_argument("--seeds", default=None, help="multi-seed summary JSON of the same setting (bench/axis_report.py)")
    ap.add_argument("--steps", type=int, default=None, help="which step count of the summary to print")
    a = ap.parse_args(argv)
    try:
        runs = [load_run(os.path.join(d, "results.json")) for d in a.runs]
        orders = sorted({r.order_seed for r in runs})
        out = [f"This run: class order seed {', '.join(map(str, orders))}.", table(runs), "", reading(runs)]
        if a.seeds:
            with open(a.seeds) as f:
                out += ["", seeds_text(json.load(f), a.steps)]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
