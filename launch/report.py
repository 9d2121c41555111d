"""`python launch/report.py ...` = `sdlora-report ...`: see sdlora_ds/cli/report.py (needs `pip install -e .`)."""
import sys

from sdlora_ds.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
