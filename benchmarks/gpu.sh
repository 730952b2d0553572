#!/usr/bin/env bash
# The GPU benchmark in one command, on a machine with one CUDA GPU and the toolkit installed
# (bash launch/setup.sh after installing the CUDA torch you want). Under 8 minutes; prints one
# table (tokens/s, samples/s, TFLOP/s, MFU, peak memory, loader wait) and writes
# runs/gpu-bench/results.json. `--smoke` runs the same pipeline with tiny models on a CPU.
# Every flag: python benchmarks/gpu_bench.py --help
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_bench.py "$@"
