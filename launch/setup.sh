#!/usr/bin/env bash
# Install the toolkit and its dependencies into the current Python environment (a venv, if one is active).
#   bash launch/setup.sh          the runtime dependencies only: what the demos need
#   bash launch/setup.sh test     plus the test extras (pytest, pytest-xdist, s3fs and moto for the S3 tests),
#                                 pinned in pyproject.toml so that pip resolves them in seconds (.ci/run uses this)
# torch goes in first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build
# on a CPU machine. On a GPU cluster, install the CUDA torch you want before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
