#!/usr/bin/env bash
# The lecture as an experiment on 2 CPU cores: a learning-rate x batch-size x model-size sweep of gpt-tiny
# shapes on the standard library's own sources, then the scaling-law fits and plots (pretrain-sweep).
#   3 sizes (widths 32, 64, 96; heads = width/16, layers = max(2, round(width/32))) x 4 LRs x 2 batches (8, 32)
#   = 24 short runs of 100 steps, each an ordinary run directory under runs/sweep-bench/points/.
# The LRs are those of width 64 (--lr-width-ref 64): width w trains at lr x 64/w. A pilot found the best LR
# near 2.5e-3 at width 96 with batch 8 and near 2e-2 at width 32 with batch 32, a decade apart: one fixed
# grid of 3-4 LRs leaves some size's optimum on its edge, a 1/width grid keeps each one inside.
# Rerunning resumes: finished points are skipped. Results: runs/sweep-bench/{sweep.jsonl,fit.json,plots/};
# the committed copies of the plots live in benchmarks/sweep/ (copied by this script).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/sweep-bench}
DATA=${DATA:-runs/sweep-bench-data}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
if [ ! -f "$DATA/manifest.json" ]; then
    # the first 60 stdlib modules: ~0.7M tokens, so no point sees a sample twice
    python - "$DATA" <<'EOF'
import subprocess, sys, sysconfig
from pathlib import Path
files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
subprocess.run([sys.executable, "-m", "data_pipelines.text.prepare", *files, "--output", sys.argv[1],
                "--vocab-size", "384", "--seq-len", "64", "--val-fraction", "0.05", "--test-fraction", "0",
                "--no-progress"], check=True)
EOF
fi
rc=0
python -m pretrain.cli.sweep --config gpt-tiny --data "$DATA" --output "$OUT" \
    --grid size=32,64,96 --grid batch=8,32 --grid lr=1.5e-3,3.5e-3,8e-3,2e-2 --lr-width-ref 64 \
    --steps 100 --warmup-fraction 0.2 --head-dim 16 --eval-samples 256 "$@" || rc=$?
echo "sweep wall time: $(( $(date +%s) - start )) s"
mkdir -p benchmarks/sweep
cp "$OUT"/plots/*.png "$OUT"/fit.json benchmarks/sweep/ 2>/dev/null || true
exit $rc
