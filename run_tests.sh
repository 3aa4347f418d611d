#!/usr/bin/env bash
# Set up everything the test suite needs (virtualenv in .venv, CPU build of torch, the
# package with its test extras) and run lint plus the whole suite. Extra arguments go to
# pytest, e.g. ./run_tests.sh -k inbox -x
set -euo pipefail
cd "$(dirname "$0")"

VENV=${IMAGINEERD_VENV:-.venv}
# The CPU build: tests never need CUDA, and a bare `torch` pulls several GB of CUDA wheels.
TORCH_SPEC=${IMAGINEERD_TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.imagineerd-test-installed"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ run_tests.sh -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install --quiet -e ".[test]"
  touch "$stamp"
fi

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
exec "$VENV/bin/python" -m pytest "$@"
