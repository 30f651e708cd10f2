#!/usr/bin/env bash
# Create .venv and install minisrv into it. Usage: scripts/setup.sh [EXTRAS], e.g. `scripts/setup.sh test`.
# On a machine without CUDA we install the CPU build of torch first, pinned to the wheel that such
# machines carry locally, so the package's `torch>=...` range is already met and pip never pulls the
# multi-GB CUDA wheels. A machine with an NVIDIA driver keeps whatever torch the user chose.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q torch
  else
    $PIP install -q "torch==${MINISRV_TORCH_VERSION:-2.13.0}"
  fi
fi
extras=${1:-}
$PIP install -q -e ".${extras:+[$extras]}"
