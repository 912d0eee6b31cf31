#!/usr/bin/env bash
# Set up fused_residual on a fresh machine: a virtual environment in .venv with torch, the package
# (C++ CPU kernels built ahead of time with ninja) and the test, benchmark and ONNX extras. Idempotent.
#
#   PYTHON=python3.11 scripts/setup.sh     choose the interpreter
#   FUSED_RESIDUAL_BUILD_CPP=0 ...          skip the C++ build (default here: 1, a failed build is an error)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch 2.14.1 / torchvision 0.29.1: the releases this project is pinned to (and that lie on the CI disk).
"$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 setuptools wheel
# --no-build-isolation: the C++ extension builds against the torch installed above.
FUSED_RESIDUAL_BUILD_CPP=${FUSED_RESIDUAL_BUILD_CPP:-1} MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/pip" install -q --no-build-isolation -e ".[test,bench,onnx]"
"$VENV/bin/fused-residual" info
