"""Entry point: `accelerate launch [--config_file launch/<topology>.yaml] launch/train.py
--config configs/<run>.json [--set key=value ...] [--resume auto|PATH]`.

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
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue a run: 'auto' = the newest complete checkpoint of the run folder (a fresh "
                             "start if there is none), or a checkpoint folder (runs/NAME/checkpoints/step-...). "
                             "Without it, a run folder that already holds checkpoints is refused.")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        from sdlora_ds.trainer import Trainer
        trainer = Trainer(cfg, resume=args.resume)
    except ValueError as e:  # user mistakes: one line naming the field/file and the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
