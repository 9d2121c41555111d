#!/usr/bin/env bash
# Install (into .venv) and run the test suite on the CPU. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
"$PY" -m pytest -q -ra "$@" tests
