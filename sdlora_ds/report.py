"""Comparing methods over seeds: finished runs' results.json -> a markdown table and PNG plots.

Reads nothing but results.json files (the trainer writes one only when a run finishes), so it
works the same on runs copied back from a cluster. Runs are grouped by their config name with the
sweep's `__s<seed>` suffix removed (sdlora-sweep names runs `<config name>__s<seed>`); every
group must hold one setting (configs equal except seeds, names and paths) and each seed once.

Per group: Avg Acc, Last Acc, forgetting and BWT as mean +- sample std over seeds (ddof 1), n
and the seeds; the mean (and std) accuracy matrix; acc_all per task (mean, min, max, std).
Against the best continual method (highest mean; joint runs, one task, are the upper bound and
are not ranked) each method's gap is compared with the spread of that gap over seeds: paired by
seed when both groups ran the same seeds (std of the per-seed gaps), else sqrt(s_a^2 + s_b^2)
(the std of the gap between two single runs). "separated" = gap > 2 x that std.

Plots (matplotlib Agg canvas, no pyplot state): accuracy on all seen classes after each task, one
line per method (mean) with a min-max (or +-std) band over seeds; and per method the mean
accuracy matrix as a labelled heatmap with each cell's mean and std.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from sdlora_ds import metrics as M
from sdlora_ds import registry
from sdlora_ds.logger import flatten

METRICS = (("avg_acc", "Avg Acc"), ("last_acc", "Last Acc"), ("forgetting", "forgetting"), ("bwt", "BWT"))
# Config fields that may differ between the seeds of one group: seeds, names, and paths or
# cadences that change nothing computed (a run copied from a cluster has other paths).
IGNORED_FIELDS = {"name", "output_dir", "seed", "cil.order_seed", "data.index", "backbone.path",
                  "data.num_workers", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "dist.timeout_s"}
BANDS = ("minmax", "std")


@dataclass
class Run:
    """One finished run, as read from its results.json."""
    path: str
    group: str
    seed: int
    order_seed: int
    acc: list            # acc[t][j], percent, row t has t+1 entries
    acc_all: list        # accuracy on all seen classes after task t
    scores: dict         # metric key -> value (recomputed from the matrix and checked)
    classes_seen: list   # number of classes seen after task t
    config: dict
    train_seconds: float
    dataset: str


@dataclass
class Group:
    """The seeds of one setting and their statistics."""
    name: str
    label: str
    runs: list
    joint: bool = False
    stats: dict = field(default_factory=dict)      # metric -> (mean, std or None)
    acc_mean: Optional[np.ndarray] = None           # (T, T), NaN above the diagonal
    acc_std: Optional[np.ndarray] = None
    all_curve: dict = field(default_factory=dict)   # mean/min/max/std over seeds of acc_all, each (T,)

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]


# ----------------------------------------------------------------------------- reading
def find_results(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(results.json paths, run folders without one). inputs: folders (searched recursively) or files."""
    found, unfinished = [], []
    for p in inputs:
        if os.path.isfile(p):
            found.append(p)
        elif os.path.isdir(p):
            found += sorted(glob.glob(os.path.join(p, "**", "results.json"), recursive=True))
            unfinished += _unfinished(p)
        else:
            raise ValueError(f"--runs {p!r}: no such file or folder; pass run folders, sweep folders or "
                             f"results.json files")
    return sorted(set(found)), unfinished


def _unfinished(root: str) -> list[str]:
    """Run folders under root (a config.json the trainer wrote) without results.json. Folders inside a
    run folder that hold a config.json of their own (checkpoints, the final model) are not runs."""
    def holding(name: str) -> set:
        return {os.path.dirname(c) for c in glob.glob(os.path.join(root, "**", name), recursive=True)}
    dirs = holding("config.json")
    owners = dirs | holding("results.json")
    runs = [d for d in dirs if not any(d.startswith(o + os.sep) for o in owners)]
    return sorted(d for d in runs if not os.path.isfile(os.path.join(d, "results.json")))


def group_name(config: dict) -> str:
    """Config name without the sweep's '__s<seed>' suffix (only when it is this run's seed)."""
    name, suffix = config["name"], f"__s{config['seed']}"
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else name


def method_label(config: dict) -> str:
    """A readable method name from what the config switches on (the method's registry label; the
    method's name for one this checkout does not have)."""
    if config["cil"]["num_tasks"] == 1:
        return "joint (upper bound)"
    spec = registry.methods().get(config["method"])
    return spec.label_of(config) if spec is not None else config["method"]


def load_run(path: str) -> Run:
    """A finished run's results; ValueError naming the file when it is unreadable or incomplete."""
    try:
        with open(path) as f:
            res = json.load(f)
        cfg = res["config"]
        acc, acc_all = res["acc_matrix"], res["acc_all"]
        T = int(cfg["cil"]["num_tasks"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a results.json of a finished run ({type(e).__name__}: {e}); remove it "
                         f"or pass only finished runs") from None
    if len(acc) != T or len(acc_all) != T or any(len(row) != t + 1 for t, row in enumerate(acc)):
        raise ValueError(f"{path}: accuracy matrix has {len(acc)} rows for cil.num_tasks={T}; the run did not "
                         f"finish or the file is damaged")
    scores = {k: float(v) for k, v in M.summarize(acc, acc_all).items() if k in dict(METRICS)}
    for k, v in scores.items():  # the file's headline numbers must be the ones its matrix gives
        if not math.isclose(v, float(res[k]), rel_tol=1e-9, abs_tol=1e-9):
            raise ValueError(f"{path}: {k} = {res[k]} but its accuracy matrix gives {v}; the file was edited or "
                             f"damaged")
    cil = cfg["cil"]
    seen = [int(cil["init_classes"]) + t * int(cil["increment"]) for t in range(T)]
    return Run(path=path, group=group_name(cfg), seed=int(cfg["seed"]), order_seed=int(cil["order_seed"]),
               acc=acc, acc_all=[float(v) for v in acc_all], scores=scores, classes_seen=seen, config=cfg,
               train_seconds=float(sum(res.get("task_seconds") or [0.0])), dataset=str(res.get("dataset", "?")))


def group_runs(runs: Sequence[Run], labels: Optional[dict] = None) -> list[Group]:
    """Groups in first-seen order, joint (upper-bound) groups last; refuses mixed settings or a seed
    twice within a group."""
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(r.group, []).append(r)
    groups = []
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r.seed)
        seen: dict[int, str] = {}
        for r in rs:
            if r.seed in seen:
                raise ValueError(f"group {name!r} has two runs with seed {r.seed}: {seen[r.seed]} and {r.path}; "
                                 f"pass each run once")
            seen[r.seed] = r.path
        ref = flatten(rs[0].config)
        for r in rs[1:]:
            other = flatten(r.config)
            for k in sorted(set(ref) & set(other)):
                if k not in IGNORED_FIELDS and ref[k] != other[k]:
                    raise ValueError(f"group {name!r}: {rs[0].path} and {r.path} differ in config field {k!r} "
                                     f"({ref[k]!r} vs {other[k]!r}), so they are not seeds of one setting; give "
                                     f"the configs different names")
        label = (labels or {}).get(name) or method_label(rs[0].config)
        groups.append(_summarize(Group(name=name, label=label, runs=rs, joint=len(rs[0].acc) == 1)))
    return sorted(groups, key=lambda g: g.joint)  # stable: the input order otherwise


# ----------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample std (ddof 1); std None for a single value."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def _summarize(g: Group) -> Group:
    T = len(g.runs[0].acc)
    g.stats = {k: mean_std([r.scores[k] for r in g.runs]) for k, _ in METRICS}
    mats = np.full((len(g.runs), T, T), np.nan)
    for i, r in enumerate(g.runs):
        for t, row in enumerate(r.acc):
            mats[i, t, :len(row)] = row
    g.acc_mean = mats.mean(axis=0)
    g.acc_std = mats.std(axis=0, ddof=1) if len(g.runs) > 1 else None
    curves = np.asarray([r.acc_all for r in g.runs])  # (n seeds, T)
    g.all_curve = {"mean": curves.mean(0), "min": curves.min(0), "max": curves.max(0),
                   "std": curves.std(0, ddof=1) if len(g.runs) > 1 else np.zeros(T)}
    return g


def compare_to_best(groups: Sequence[Group], metric: str) -> dict[str, dict]:
    """Per continual group: gap to the best continual group's mean on `metric` and its spread."""
    ranked = [g for g in groups if not g.joint]
    if not ranked:
        return {}
    best = max(ranked, key=lambda g: g.stats[metric][0])
    out = {}
    for g in ranked:
        gap = best.stats[metric][0] - g.stats[metric][0]
        if g is best:
            out[g.name] = {"best": True, "gap": 0.0, "std": None, "paired": None, "separated": None}
            continue
        a = {r.seed: r.scores[metric] for r in best.runs}
        b = {r.seed: r.scores[metric] for r in g.runs}
        if set(a) == set(b) and len(a) > 1:  # same seeds = same class orders: compare seed by seed
            sd = mean_std([a[s] - b[s] for s in sorted(a)])[1]
            paired = True
        elif best.stats[metric][1] is not None and g.stats[metric][1] is not None:
            sd = math.sqrt(best.stats[metric][1] ** 2 + g.stats[metric][1] ** 2)
            paired = False
        else:
            sd, paired = None, None
        out[g.name] = {"best": False, "gap": gap, "std": sd, "paired": paired,
                       "separated": None if sd is None else bool(gap > 2 * sd)}
    return out


# ----------------------------------------------------------------------------- markdown
def _pm(mean: float, std: Optional[float]) -> str:
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} (n=1)"


def _gap_cell(c: dict) -> str:
    if c["best"]:
        return "best"
    if c["std"] is None:
        return f"-{c['gap']:.2f} (one seed: no spread)"
    how = "paired" if c["paired"] else "unpaired"
    return f"-{c['gap']:.2f} ({how} std {c['std']:.2f}): {'yes' if c['separated'] else 'no'}"


def _setting(cfg: dict) -> str:
    o, cil = cfg["optim"], cfg["cil"]
    tasks = f"{cil['num_tasks']} task{'s' if cil['num_tasks'] != 1 else ''}"
    return (f"{tasks} ({cil['init_classes']}+{cil['increment']}), {o['epochs']} epochs/task, "
            f"batch {o['global_batch']}, lr {o['lr']}, rank {cfg['adapter']['rank']}")


def markdown(groups: Sequence[Group], plots: dict, unfinished: Sequence[str], band: str) -> str:
    gaps = {m: compare_to_best(groups, m) for m in ("avg_acc", "last_acc")}
    n_runs = sum(len(g.runs) for g in groups)
    lines = ["# Method comparison over seeds", "",
             f"{n_runs} finished runs (results.json) in {len(groups)} groups. Values: mean ± sample std over "
             f"seeds (ddof 1), in percent. Forgetting: mean drop from each task's best accuracy to the last "
             f"(lower is better); BWT: mean final minus just-trained accuracy (negative = forgetting).", "",
             "| method | config | n | seeds | Avg Acc | Last Acc | forgetting | BWT | Avg gap to best > 2 std? "
             "| Last gap to best > 2 std? |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        cells = [_pm(*g.stats[k]) for k, _ in METRICS]
        gap = ["upper bound (not ranked)"] * 2 if g.joint else [_gap_cell(gaps[m][g.name]) for m in ("avg_acc",
                                                                                                       "last_acc")]
        lines.append(f"| {g.label} | `{g.name}` | {len(g.runs)} | {', '.join(map(str, g.seeds))} | "
                     + " | ".join(cells) + " | " + " | ".join(gap) + " |")
    lines += ["", "Gap columns: the best continual method's mean minus this one's, then the spread of that gap "
              "over seeds (paired: std of the per-seed gaps when both ran the same seeds, i.e. the same class "
              "orders; unpaired: sqrt(s_best^2 + s^2)), then whether the gap exceeds twice that spread. "
              "\"no\" means the seed-to-seed spread is as large as the difference: the runs do not rank the two.",
              "", "## Settings", "", "| config | setting | dataset | backbone | mean train time (s) |",
              "|---|---|---|---|---|"]
    for g in groups:
        c = g.runs[0].config
        t = np.mean([r.train_seconds for r in g.runs])
        lines.append(f"| `{g.name}` | {_setting(c)} | {g.runs[0].dataset} | "
                     f"{c['backbone'].get('weights_name') or c['backbone'].get('path')} | {t:.1f} |")
    band_text = "min-max over seeds" if band == "minmax" else "mean ± 1 sample std over seeds"
    lines += ["", "## Accuracy on all seen classes", "",
              f"![accuracy on all seen classes]({os.path.basename(plots['seen'])})", "",
              f"Line: mean over seeds; band: {band_text}. Joint runs: dashed line (one task, all classes).", "",
              "## Accuracy matrices (mean over seeds)", "",
              "Row t: after training task t; column j: accuracy on task j's classes (task j = the j-th task "
              "trained; which classes that is depends on each seed's class order).", ""]
    for g in groups:
        if g.name in plots["matrix"]:
            lines += [f"### {g.label} (`{g.name}`)", "", f"![{g.label}]({os.path.basename(plots['matrix'][g.name])})",
                      "", "```", M.format_matrix([list(row[:t + 1]) for t, row in enumerate(g.acc_mean)],
                                                 list(g.all_curve["mean"])), "```", ""]
    lines += ["## Runs", ""] + [f"- `{g.name}` seed {r.seed} (class order seed {r.order_seed}): {r.path}"
                                for g in groups for r in g.runs]
    if unfinished:
        lines += ["", f"Skipped {len(unfinished)} run folder(s) without results.json (not finished):", ""]
        lines += [f"- {p}" for p in unfinished]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots
def _figure(w: float, h: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def plot_seen_accuracy(groups: Sequence[Group], path: str, band: str = "minmax", dpi: int = 110) -> None:
    """Accuracy on all seen classes vs classes seen: one line per continual method, band over seeds."""
    if band not in BANDS:
        raise ValueError(f"band {band!r}: must be one of {BANDS}")
    fig = _figure(7.0, 4.5, dpi)
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{i % 10}" for i in range(len(groups))]
    for g, col in zip(groups, colors):
        c, x = g.all_curve, g.runs[0].classes_seen
        if g.joint:
            ax.axhline(c["mean"][0], color=col, linestyle="--", label=f"{g.label} (n={len(g.runs)})")
            continue
        lo, hi = (c["min"], c["max"]) if band == "minmax" else (c["mean"] - c["std"], c["mean"] + c["std"])
        ax.plot(x, c["mean"], marker="o", color=col, label=f"{g.label} (n={len(g.runs)})")
        if len(g.runs) > 1:
            ax.fill_between(x, lo, hi, color=col, alpha=0.2, linewidth=0)
    ticks = sorted({x for g in groups if not g.joint for x in g.runs[0].classes_seen})
    if ticks:
        ax.set_xticks(ticks)
    ax.set_xlabel("classes seen (after each task)")
    ax.set_ylabel("accuracy on all seen classes (%)")
    band_text = "min-max" if band == "minmax" else "±1 std"
    ax.set_title(f"accuracy after each task: mean over seeds, band = {band_text}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)


def plot_matrix(g: Group, path: str, dpi: int = 110) -> None:
    """The group's mean accuracy matrix (cells: mean, and std when n > 1), 'all seen' column. Above
    M.CELL_TEXT_MAX_TASKS tasks: a fixed-size heat map without cell text (the all-seen column ~5 %
    of the width), so the figure stays readable and small at T = 200."""
    T = g.acc_mean.shape[0]
    cell_text = T <= M.CELL_TEXT_MAX_TASKS
    all_w = 1 if cell_text else max(1, round(T / 20))
    grid = np.concatenate([g.acc_mean, np.repeat(g.all_curve["mean"][:, None], all_w, axis=1)], axis=1)
    spread = None
    if g.acc_std is not None:
        spread = np.concatenate([g.acc_std, g.all_curve["std"][:, None]], axis=1)
    fig = _figure(2.2 + 0.9 * (T + 1), 1.6 + 0.6 * T, dpi) if cell_text else _figure(10.0, 8.0, dpi)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    small = 8 if T <= 10 else 6
    if cell_text:
        for t in range(T):
            for j in range(T + 1):
                if np.isnan(grid[t, j]):
                    continue
                text = f"{grid[t, j]:.1f}" + (f"\n±{spread[t, j]:.1f}" if spread is not None else "")
                ax.text(j, t, text, ha="center", va="center", fontsize=small,
                        color="black" if grid[t, j] > 60 else "white")
        ax.set_xticks(range(T + 1), [f"task {j}" for j in range(T)] + ["all seen"], fontsize=small,
                      rotation=45 if T > 6 else 0)
        ax.set_yticks(range(T), [f"after task {t}" for t in range(T)], fontsize=small)
    else:
        ticks = M.task_ticks(T)
        ax.set_xticks(ticks + [T + (all_w - 1) / 2], [str(j) for j in ticks] + ["all"], fontsize=8)
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=8)
        ax.set_xlabel("task evaluated", fontsize=8)
        ax.set_ylabel("after task", fontsize=8)
    ax.axvline(T - 0.5, color="white", linewidth=2)
    cells = "mean ± sample std" if spread is not None else "one seed"
    ax.set_title(f"{g.label} ({g.name}): accuracy (%), {cells} over {len(g.runs)} seed(s)", fontsize=small + 1)
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03).set_label("accuracy (%)", fontsize=small)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------- the whole report
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


def write_report(inputs: Sequence[str], out_dir: str, labels: Optional[dict] = None, band: str = "minmax") -> dict:
    """Read, group, plot and write report.md + summary.json under out_dir; returns the written paths."""
    paths, unfinished = find_results(inputs)
    if not paths:
        raise ValueError(f"no results.json under {list(inputs)} ({len(unfinished)} unfinished run folder(s)); "
                         f"finish the runs first (sdlora-sweep resumes them)")
    groups = group_runs([load_run(p) for p in paths], labels)
    os.makedirs(out_dir, exist_ok=True)
    plots = {"seen": os.path.join(out_dir, "seen_accuracy.png"), "matrix": {}}
    plot_seen_accuracy(groups, plots["seen"], band)
    for g in groups:
        if not g.joint:  # a 1x1 matrix says nothing the table does not
            plots["matrix"][g.name] = os.path.join(out_dir, f"acc_matrix_{_slug(g.name)}.png")
            plot_matrix(g, plots["matrix"][g.name])
    md = os.path.join(out_dir, "report.md")
    with open(md, "w") as f:
        f.write(markdown(groups, plots, unfinished, band))
    summary = {"groups": [{"name": g.name, "label": g.label, "joint": g.joint, "seeds": g.seeds,
                           "runs": [r.path for r in g.runs],
                           "stats": {k: {"mean": g.stats[k][0], "std": g.stats[k][1]} for k, _ in METRICS},
                           "acc_all_mean": [float(v) for v in g.all_curve["mean"]]} for g in groups],
               "gap_to_best": {m: compare_to_best(groups, m) for m in ("avg_acc", "last_acc")},
               "unfinished": list(unfinished), "std": "sample std over seeds (ddof 1)"}
    js = os.path.join(out_dir, "summary.json")
    with open(js, "w") as f:
        json.dump(summary, f, indent=1)
    return {"markdown": md, "summary": js, "seen_plot": plots["seen"], "matrix_plots": plots["matrix"]}
