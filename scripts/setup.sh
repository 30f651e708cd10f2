#!/usr/bin/env bash
# Create .venv and install minisrv into it. Usage: scripts/setup.sh [EXTRAS], e.g. `scripts/setup.sh test`.
# On a machine without CUDA we install the CPU build of torch first, so the package's `torch>=...` range is
# already met and pip never pulls the multi-GB CUDA wheels. A machine with an NVIDIA driver keeps whatever
# torch the user chose.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q torch
  else
    # A wheel pip's find-links already hold (this project's CI machines carry one), else PyTorch's CPU index:
    # PyPI's Linux wheel of the same version bundles CUDA. Its dependencies come with the package below.
    torch_spec="torch==${MINISRV_TORCH_VERSION:-2.13.0}"
    $PIP install -q --no-index --no-deps "$torch_spec" 2>/dev/null ||
      $PIP install -q --no-deps --index-url https://download.pytorch.org/whl/cpu "$torch_spec"
  fi
fi
extras=${1:-}
$PIP install -q -e ".${extras:+[$extras]}"
