# Sourced by launch/demo.sh and launch/test.sh: create .venv (once) and install the package into it
# (`pip install -e .[dev]`: dependencies from pyproject.toml, sdlora_ds and shards importable from anywhere).
# Set SDLORA_VENV to use another folder, or SDLORA_NO_INSTALL=1 to use the current python as is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${SDLORA_NO_INSTALL:-0}" = "1" ]; then
  PY="$(command -v python3)"
  # from / : run from the checkout, `python -c` would find sdlora_ds in the current folder, the scripts would not
  (cd / && "$PY" -c "import sdlora_ds") 2>/dev/null || { echo "error: SDLORA_NO_INSTALL=1 but sdlora_ds is not importable by $PY; run \`$PY -m pip install -e .\` (add --no-deps to keep your packages)" >&2; exit 2; }
else
  VENV="${SDLORA_VENV:-$ROOT/.venv}"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]"
  PY="$VENV/bin/python"
  export PATH="$VENV/bin:$PATH"
fi
export PYTHONUNBUFFERED=1
