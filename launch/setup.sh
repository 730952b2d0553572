#!/usr/bin/env bash
# Install the toolkit and its dependencies into the current Python environment.
# torch goes in first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build
# on a CPU machine. On a GPU cluster, install the CUDA torch you want before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
