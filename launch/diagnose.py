"""`python launch/diagnose.py ...` = `sdlora-diagnose ...`: see sdlora_ds/cli/diagnose.py (needs `pip install -e .`)."""
import sys

from sdlora_ds.cli.diagnose import main

if __name__ == "__main__":
    sys.exit(main())
