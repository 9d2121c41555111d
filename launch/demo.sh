#!/usr/bin/env bash
# Install (into .venv) and run the embedded demo: digits, B2-2-5, a small ViT, CPU, a few minutes.
#   1. shards of scikit-learn's digits (pretrain / train / test splits)
#   2. the demo "pretrained" backbone, trained on the pretrain split only
#   3. SD-LoRA continual training through accelerate launch; prints the accuracy matrix
# Extra arguments go to train.py (e.g. --set optim.epochs=3). A re-run resumes the run folder (--resume
# auto): it continues an interrupted run, or reprints the results of a finished one.
source "$(dirname "$0")/env.sh"
NPROC="${NPROC:-1}"
[ -f data/digits/index.json ] || "$PY" -m shards.digits --out data/digits
[ -f data/demo_backbone/config.json ] || "$PY" launch/pretrain_demo_backbone.py --config configs/demo_digits.json
accelerate launch --config_file launch/accelerate_cpu.yaml --num_processes "$NPROC" \
  launch/train.py --config configs/demo_digits.json --resume auto "$@"
