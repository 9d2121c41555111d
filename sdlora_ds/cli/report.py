"""Compare methods over seeds: `sdlora-report --runs runs/sweep_X [more folders or results.json]
--out docs/compare_X [--label GROUP=TEXT ...] [--band minmax|std]`.

Reads finished runs' results.json only (runs copied back from a cluster work the same), groups
them by config name (the sweep's `__s<seed>` suffix removed) and writes report.md (Avg/Last Acc,
forgetting, BWT as mean ± std over seeds, gaps to the best method against their spread),
summary.json, seen_accuracy.png and acc_matrix_<group>.png into --out. Logic: sdlora_ds/report.py.
"""
import argparse
import sys

from sdlora_ds.errors import run_cli
from sdlora_ds.report import BANDS, write_report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="markdown table + plots comparing methods over seeds")
    ap.add_argument("--runs", nargs="+", required=True, help="sweep/run folders (searched for results.json) or files")
    ap.add_argument("--out", required=True, help="output folder (report.md, summary.json, PNG plots)")
    ap.add_argument("--label", action="append", default=[], metavar="GROUP=TEXT",
                    help="display name of a group (default: from the config: SD-LoRA, SD-LoRA-RR, seq. LoRA, ...)")
    ap.add_argument("--band", choices=BANDS, default="minmax", help="band over seeds in the accuracy plot")
    return run_cli(_report, ap.parse_args(argv))


def _report(a) -> None:
    try:
        labels = dict(item.split("=", 1) for item in a.label)
    except ValueError:
        raise ValueError(f"--label expects GROUP=TEXT, got {a.label}") from None
    print(write_report(a.runs, a.out, labels, a.band)["markdown"])


if __name__ == "__main__":
    sys.exit(main())
