#!/usr/bin/env bash
# Set up (virtualenv in .venv, install) and run the daemon on port 5000.
#   ./start_server.sh                      uses ./config.yaml
#   IMAGINEERD_CONFIG=/etc/imagineerd.yaml ./start_server.sh --port 8080
set -euo pipefail
cd "$(dirname "$0")"

VENV=${IMAGINEERD_VENV:-.venv}
CONFIG=${IMAGINEERD_CONFIG:-config.yaml}

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.imagineerd-installed"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [ -n "${IMAGINEERD_TORCH_SPEC:-}" ]; then
      "$VENV/bin/python" -m pip install "$IMAGINEERD_TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1; then
      "$VENV/bin/python" -m pip install torch      # CUDA build for the GPU
    else
      "$VENV/bin/python" -m pip install torch==2.13.0
    fi
  fi
  "$VENV/bin/python" -m pip install --quiet -e .
  touch "$stamp"
fi

exec "$VENV/bin/imagineerd" serve --config "$CONFIG" "$@"
