#!/usr/bin/env bash
# The walking skeleton end to end on a CPU: install the runtime dependencies (launch/setup.sh; the test
# extras are .ci/run's), turn the Python standard library's sources
# into token shards, pretrain gpt-tiny on 2 ranks with ZeRO-2, evaluate, export, and sample.
# A few minutes on 2 cores. Env: NUM_GPUS (ranks, default 2), DS_CONFIG, STEPS, OUT (default runs/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== 0/5 install the runtime dependencies (launch/setup.sh)"
bash launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NUM_GPUS=${NUM_GPUS:-2}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_fp32.json}
STEPS=${STEPS:-200}
OUT=${OUT:-runs/demo}
STDLIB=$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

echo "== 1/5 prepare-text: $STDLIB/*.py -> $OUT/data"
prepare-text "$STDLIB"/*.py --output "$OUT/data" --overwrite --vocab-size 4096 --seq-len 128 \
  --val-fraction 0.05 --test-fraction 0.05 --samples-per-shard 1024 --workers 2

echo "== 2/5 train gpt-tiny on $NUM_GPUS ranks with $DS_CONFIG"
deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" pretrain/train.py --config gpt-tiny \
  --deepspeed_config "$DS_CONFIG" --data "$OUT/data" --output-dir "$OUT/gpt-tiny" --max-steps "$STEPS" --resume none

echo "== 3/5 evaluate on val"
pretrain-eval --checkpoint "$OUT/gpt-tiny" --data "$OUT/data" --split val

echo "== 4/5 export to a Hugging Face directory"
rm -rf "$OUT/gpt-tiny-hf"
pretrain-export --checkpoint "$OUT/gpt-tiny" --output "$OUT/gpt-tiny-hf"

echo "== 5/5 sample from the exported model"
pretrain-sample --model "$OUT/gpt-tiny-hf" --prompt "def " --max-new-tokens 60
echo "metrics: $OUT/gpt-tiny/metrics.jsonl   tensorboard: tensorboard --logdir $OUT/gpt-tiny/tensorboard"
