#!/usr/bin/env bash
# The fast smoke demo: digits, B2-2-5, a small ViT pretrained here on a disjoint split, CPU, ~1 minute.
# (The real demo, a pretrained DINOv2 on Animal-MNIST, is launch/demo.sh.)
#   1. shards of scikit-learn's digits (pretrain / train / test splits)
#   2. the stand-in "pretrained" backbone, trained on the pretrain split only
#   3. SD-LoRA continual training through accelerate launch; prints the accuracy matrix
# Extra arguments go to train.py. A re-run resumes the run folder (--resume auto). NPROC=2 runs on two
# CPU processes into its own folder (runs/demo_digits_2proc), never relabelling a 1-process run.
source "$(dirname "$0")/env.sh"
NPROC="${NPROC:-1}"
NAME=demo_digits; [ "$NPROC" = "1" ] || NAME="demo_digits_${NPROC}proc"
[ -f data/digits/index.json ] || "$PY" -m shards.digits --out data/digits
[ -f data/demo_backbone/config.json ] || "$PY" launch/pretrain_demo_backbone.py --config configs/demo_digits.json
"$PY" launch/run.py --config_file launch/accelerate_cpu.yaml --num_processes "$NPROC" --main_process_port 0 \
  launch/train.py --config configs/demo_digits.json --set name="$NAME" --resume auto "$@"
