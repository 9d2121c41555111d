"""Split a finished run's errors into within-task and between-task ones (task-aware accuracy),
and print its task-boundary diagnostics (results.json 'boundaries', sdlora_ds/boundaries.py):

    sdlora-diagnose --run runs/NAME [--json out.json] [--boundaries-only]

Run from the folder training ran in (the config's data.index is read as given). Logic:
sdlora_ds/diagnose.py. Task-aware accuracy uses the true task id: a diagnostic, not a CIL result.
"""
import argparse
import json
import os
import sys

from sdlora_ds.diagnose import diagnose_run, format_diagnosis
from sdlora_ds.errors import run_cli
from sdlora_ds.boundaries import format_boundaries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="task-aware vs task-agnostic accuracy of a finished run")
    parser.add_argument("--run", required=True, help="run folder (runs/NAME) with config.json and final_model.pt")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--boundaries-only", action="store_true",
                        help="print the boundary diagnostics of results.json only (no evaluation pass)")
    return run_cli(_diagnose, parser.parse_args(argv))


def _diagnose(args) -> None:
    results = os.path.join(args.run, "results.json")
    if not os.path.isfile(results):
        raise ValueError(f"{results} not found; --run takes the folder of a finished run")
    with open(results) as f:
        boundaries = json.load(f).get("boundaries")
    d = {}
    if not args.boundaries_only:
        d = diagnose_run(args.run, batch_size=args.batch)
        print(format_diagnosis(d))
    if boundaries is None:
        print("task boundaries: not recorded (the run predates the boundary diagnostics)")
    else:
        print("task boundaries:\n" + (format_boundaries(boundaries) or "  none (a single task)"))
    d["boundaries"] = boundaries
    if args.json:
        with open(args.json, "w") as f:
            json.dump(d, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
