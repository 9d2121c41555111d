#!/usr/bin/env bash
# Every GPU measurement of the project in one call (< 8 min on one H100/H200); see bench/gpu_check.py.
#   bash bench/gpu_check.sh                    # writes $OUT/gpu_check.json and $OUT/gpu_check.md
#   bash bench/gpu_check.sh --only e2e_train   # rerun one part (comma-separated list)
#   bash bench/gpu_check.sh --cpu-smoke        # the same parts, tiny shapes, CPU (or SDLORA_GPU_CHECK_CPU=1)
# Python: $PYTHON, else .venv/bin/python if present, else python3. Nothing is installed or downloaded:
# missing packages are listed first (install them with `pip install -r requirements.txt`).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# the checkout's sdlora_ds and shards, installed or not (bench/ itself is the script's folder)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || command -v python)"; fi
fi
OUT="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
exec "$PY" bench/gpu_check.py --out "$OUT" "$@"
