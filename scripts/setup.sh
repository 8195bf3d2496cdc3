#!/usr/bin/env bash
# Install ckptavg (editable) with what the tests and the demo need.
# Where no torch is installed, install torch==2.13.0 first: on this project's machines that is a small
# CPU build from a local file, while a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
