"""Export a finished run as a transformers image-classification folder:

    sdlora-export --run runs/NAME --out exported/NAME

Works from any directory: a relative backbone.path in the run's config.json (as given to training)
is looked up in the folder training ran in (the run folder minus output_dir/name: for runs/NAME,
the folder holding runs/), then in the current directory; the backbone fingerprint stored in
final_model.pt confirms the weights. A mistake (no such run, backbone not found or changed) is one
`error:` line, exit code 2. Logic: sdlora_ds/export.py.
"""
import argparse
import sys

from sdlora_ds.errors import run_cli
from sdlora_ds.export import export_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fold SD-LoRA into the dense weights and write a transformers "
                                                 "ViT/Dinov2(WithRegisters)ForImageClassification folder (safetensors)")
    parser.add_argument("--run", required=True, help="run folder (runs/NAME) with config.json and final_model.pt")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the check that the exported model's logits equal the trained model's")
    args = parser.parse_args(argv)
    return run_cli(_export, args)


def _export(args) -> None:
    out = export_run(args.run, args.out, verify=not args.no_verify)
    print(f"exported {args.run} -> {out} (load with AutoModelForImageClassification.from_pretrained or "
          f"pipeline('image-classification', model={out!r}))")


if __name__ == "__main__":
    sys.exit(main())
