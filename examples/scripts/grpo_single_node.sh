#!/usr/bin/env bash
# GRPO on one node with torchrun, in bf16 (PRECISION=--fp16 or PRECISION= for fp32). Sizes come from the
# environment; any extra flags are passed on.
#
#   DATA=/data/longvideo_reason/qa.jsonl VIDEOS=/data/videos TOKENIZER=/models/qwen2-7b \
#   NPROC=8 TP=2 CP=4 FRAMES=512 bash examples/scripts/grpo_single_node.sh --engine vllm --save ckpt/grpo
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DATA:?set DATA to the RL jsonl}" "${VIDEOS:?set VIDEOS to the video folder}" "${TOKENIZER:?set TOKENIZER}"
torchrun --standalone --nproc-per-node "${NPROC:-8}" examples/train_grpo.py \
  --tensor-model-parallel-size "${TP:-1}" --context-parallel-size "${CP:-1}" \
  --data-path "$DATA" --video-root "$VIDEOS" --tokenizer "$TOKENIZER" \
  --num-frames "${FRAMES:-64}" --group-size "${G:-8}" --prompts-per-step "${PROMPTS:-4}" \
  --train-iters "${ITERS:-1000}" --lr "${LR:-1e-6}" ${PRECISION---bf16} "$@"
