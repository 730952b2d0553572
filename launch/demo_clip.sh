#!/usr/bin/env bash
# CLIP end to end on a CPU: install the runtime dependencies, make a synthetic image-caption set (shapes x colours, some
# classes held out of train), pretrain clip-tiny on 2 ranks with ZeRO-2 (contrastive loss over the
# all-gathered global batch), evaluate zero-shot and retrieval on val, export for CLIPModel.
# About a minute of training on 2 cores. Env: NUM_GPUS (ranks, default 2), DS_CONFIG, STEPS, OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NUM_GPUS=${NUM_GPUS:-2}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_fp32.json}
STEPS=${STEPS:-150}
OUT=${OUT:-runs/demo-clip}

echo "== 1/4 make-synthetic-image-text -> $OUT/data"
make-synthetic-image-text --output "$OUT/data" --count 4000 --image-size 48 --overwrite

echo "== 2/4 train clip-tiny on $NUM_GPUS ranks with $DS_CONFIG"
deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29501}" pretrain/train.py --config clip-tiny \
  --deepspeed_config "$DS_CONFIG" --data "$OUT/data" --output-dir "$OUT/clip-tiny" --max-steps "$STEPS" --resume none

echo "== 3/4 zero-shot and retrieval on val"
pretrain-eval --checkpoint "$OUT/clip-tiny" --data "$OUT/data" --split val

echo "== 4/4 export to a Hugging Face CLIP directory"
rm -rf "$OUT/clip-tiny-hf"
pretrain-export --checkpoint "$OUT/clip-tiny" --output "$OUT/clip-tiny-hf"
echo "load it: CLIPModel.from_pretrained('$OUT/clip-tiny-hf'), AutoTokenizer.from_pretrained('$OUT/clip-tiny-hf')"
