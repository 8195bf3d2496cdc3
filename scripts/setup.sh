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
# DeepSpeed, for tests/test_deepspeed.py. Not in the test extras: it is an sdist whose setup.py imports torch, so
# pip's isolated build (which installing from the extras would use) downloads a second, multi-GB torch. Built here
# against the installed torch (--no-build-isolation, with its build tools), and without compiling its C++/CUDA ops.
"$PY" -m pip install --quiet --disable-pip-version-check setuptools wheel
DS_BUILD_OPS=0 "$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation "deepspeed==0.19.8"
