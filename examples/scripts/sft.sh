#!/usr/bin/env bash
# CoT-SFT (loss on the response only; parallel encoding + CP sharding for long videos) under torchrun
# on one node, starting from a pretrain checkpoint (LOAD, weights only) when one is given.
#
# Sizes come from the environment; any extra arguments go to examples/sft.py (e.g. --config run.json).
# A rerun with the same SAVE resumes from its latest complete checkpoint.
#
# CPU demo (2 ranks, CP=2, after examples/scripts/pretrain.sh):
#   NPROC=2 CP=2 ITERS=60 LR=1e-3 DATA_DIR=demo/data LOAD=demo/pretrain SAVE=demo/sft bash examples/scripts/sft.sh
# GPU node (8 ranks, TP=2 x CP=4 with sequence parallelism, Ulysses CP, 1 fps up to 1024 frames):
#   NPROC=8 TP=2 CP=4 DATA_PATH=data/qa.jsonl VIDEO_ROOT=data/videos TOKENIZER=tok/ GBS=64 ITERS=2000 LR=1e-5 \
#     LOAD=ckpt/pretrain SAVE=ckpt/sft bash examples/scripts/sft.sh --sequence-parallel --cp-comm-type a2a \
#     --fps 1 --max-frames 1024 --save-interval 200
set -euo pipefail
cd "$(dirname "$0")/../.."

NPROC=${NPROC:-2}; TP=${TP:-1}; PP=${PP:-1}; CP=${CP:-2}
MBS=${MBS:-1}; GBS=${GBS:-}; ITERS=${ITERS:-60}; LR=${LR:-1e-3}
SAVE=${SAVE:-demo/sft}; SAVE_INTERVAL=${SAVE_INTERVAL:-0}; LOAD=${LOAD:-}

data=()
if [[ -n "${DATA_PATH:-}" ]]; then
  data=(--data-path "$DATA_PATH" --video-root "$VIDEO_ROOT" --tokenizer "$TOKENIZER")
else
  data=(--synthetic-data "${DATA_DIR:-demo/data}")
fi
batch=(--micro-batch-size "$MBS")
[[ -n "$GBS" ]] && batch+=(--global-batch-size "$GBS")
start=()
[[ -n "$LOAD" ]] && start=(--load "$LOAD" --finetune)

exec torchrun --standalone --nproc-per-node "$NPROC" examples/sft.py \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --context-parallel-size "$CP" \
  "${data[@]}" "${batch[@]}" "${start[@]}" --train-iters "$ITERS" --lr "$LR" \
  --save "$SAVE" --save-interval "$SAVE_INTERVAL" --tensorboard-dir "$SAVE/tensorboard" "$@"
