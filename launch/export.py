"""`python launch/export.py ...` = `sdlora-export ...`: see sdlora_ds/cli/export.py (needs `pip install -e .`)."""
import sys

from sdlora_ds.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
