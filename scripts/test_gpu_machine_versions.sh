#!/usr/bin/env bash
# Run the test suite (Triton kernels under the interpreter) against the versions the lent GPU machine has:
# torch 2.11, torchvision 0.26, triton 3.6, instead of this project's pinned torch 2.14 / triton 3.8. Catches
# API drift before a GPU run does (torch.library defaults, what dynamo can trace, triton's APIs).
#
#   scripts/test_gpu_machine_versions.sh [pytest args]        (needs the package index; about 4 GB download)
#
# The venv lives in ${COMPAT_VENV:-/tmp/fr-compat-venv} and is reused; the tests run in a copy of the tracked
# files (built there, so this tree's C++ extensions stay built for the pinned torch). numpy stays below 2.3:
# triton 3.6's interpreter converts 1-element arrays to ints, which newer numpy refuses. (The GPU machine
# runs Python 3.12; this uses the local python3.)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${COMPAT_VENV:-/tmp/fr-compat-venv}
WORK=$(mktemp -d /tmp/fr-compat-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.3" pytest hypothesis timm \
    onnx onnxscript onnxruntime \
    matplotlib ninja setuptools wheel
fi
"$VENV/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, '| triton', triton.__version__, \
'| numpy', numpy.__version__)"

git ls-files -z | tar -c --null -T - -f - | tar -x -f - -C "$WORK"
cd "$WORK"
FUSED_RESIDUAL_BUILD_CPP=1 MAX_JOBS=2 "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . > build.log 2>&1 \
  || { tail -n 40 build.log; exit 1; }
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning "$@"
