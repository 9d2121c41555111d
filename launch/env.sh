# Sourced by launch/demo.sh and launch/test.sh: create .venv (once) and install the requirements.
# Set SDLORA_VENV to use another folder, or SDLORA_NO_INSTALL=1 to use the current python as is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${SDLORA_NO_INSTALL:-0}" = "1" ]; then
  PY="$(command -v python3)"
else
  VENV="${SDLORA_VENV:-$ROOT/.venv}"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-dev.txt"
  PY="$VENV/bin/python"
  export PATH="$VENV/bin:$PATH"
fi
export PYTHONUNBUFFERED=1
