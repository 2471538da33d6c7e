#!/usr/bin/env bash
# Projector pretraining (stage 1: LLM and vision tower frozen) under torchrun on one node.
#
# Sizes come from the environment; any extra arguments go to examples/pretrain.py (e.g. --config run.json).
#
# CPU demo (2 ranks, CP=2, synthetic videos written to demo/data on first use):
#   NPROC=2 CP=2 ITERS=30 LR=1e-3 DATA_DIR=demo/data SAVE=demo/pretrain bash examples/scripts/pretrain.sh
# GPU node (8 ranks, TP=2, your data and tokenizer):
#   NPROC=8 TP=2 DATA_PATH=data/captions.jsonl VIDEO_ROOT=data/videos TOKENIZER=tok/ MBS=4 GBS=256 \
#     ITERS=2000 SAVE=ckpt/pretrain bash examples/scripts/pretrain.sh --num-frames 32
set -euo pipefail
cd "$(dirname "$0")/../.."

NPROC=${NPROC:-2}; TP=${TP:-1}; PP=${PP:-1}; CP=${CP:-1}
MBS=${MBS:-1}; GBS=${GBS:-}; ITERS=${ITERS:-30}; LR=${LR:-1e-3}
SAVE=${SAVE:-demo/pretrain}; SAVE_INTERVAL=${SAVE_INTERVAL:-0}

data=()
if [[ -n "${DATA_PATH:-}" ]]; then
  data=(--data-path "$DATA_PATH" --video-root "$VIDEO_ROOT" --tokenizer "$TOKENIZER")
else
  data=(--synthetic-data "${DATA_DIR:-demo/data}")
fi
batch=(--micro-batch-size "$MBS")
[[ -n "$GBS" ]] && batch+=(--global-batch-size "$GBS")

exec torchrun --standalone --nproc-per-node "$NPROC" examples/pretrain.py \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --context-parallel-size "$CP" \
  "${data[@]}" "${batch[@]}" --train-iters "$ITERS" --lr "$LR" \
  --save "$SAVE" --save-interval "$SAVE_INTERVAL" --tensorboard-dir "$SAVE/tensorboard" "$@"
