"""`python launch/sweep.py ...` = `sdlora-sweep ...` (see sdlora_ds/cli/sweep.py; needs `pip install -e .`),
with this folder's train.py and accelerate configs found from any current folder."""
import os
import sys

from sdlora_ds.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main(launch_dir=os.path.relpath(os.path.dirname(os.path.abspath(__file__)))))
