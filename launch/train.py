"""Entry point: `accelerate launch launch/train.py --config configs/<run>.json [--set key=value ...]`.

Parses arguments, loads the config, runs the Trainer. No logic lives here.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sdlora_ds.config import load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="SD-LoRA class-incremental training")
    parser.add_argument("--config", required=True, help="JSON run config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set optim.lr=0.005 (repeatable; VALUE is JSON)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        from sdlora_ds.trainer import Trainer
        trainer = Trainer(cfg)
    except ValueError as e:  # user mistakes: one line naming the field/file and the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
