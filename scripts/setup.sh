#!/usr/bin/env bash
# Create .venv (once) with torch + torchvision and radio-distill installed editable with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    echo "setup: installing torch 2.14.1 + torchvision 0.29.1 (once; a few minutes)"
    # torchvision from PyPI fails beside other torch builds: install the matching pair together
    .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
if ! .venv/bin/python -c "import sam2" 2>/dev/null; then
    echo "setup: building Meta's sam2 (an sdist) against this torch, without its CUDA kernels (video only)"
    .venv/bin/python -m pip install -q "setuptools>=70.1"
    SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-build-isolation -c scripts/constraints.txt sam2
fi
echo "setup: installing radio-distill and its dependencies (pinned by scripts/constraints.txt)"
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[test]"
echo "setup: done"
