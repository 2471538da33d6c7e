#!/usr/bin/env bash
# GRPO on several nodes with torchrun's c10d rendezvous: run this same command on every node, with
# MASTER_ADDR set to the first node's address (no per-node rank is needed).
#
#   MASTER_ADDR=node0 NNODES=4 DATA=... VIDEOS=... TOKENIZER=... TP=2 CP=8 bash examples/scripts/grpo_multi_node.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MASTER_ADDR:?set MASTER_ADDR}" "${NNODES:?set NNODES}" "${DATA:?}" "${VIDEOS:?}" "${TOKENIZER:?}"
torchrun --nnodes "$NNODES" --nproc-per-node "${NPROC:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RUN_ID:-mlv-grpo}" \
  examples/train_grpo.py \
  --tensor-model-parallel-size "${TP:-1}" --context-parallel-size "${CP:-1}" \
  --data-path "$DATA" --video-root "$VIDEOS" --tokenizer "$TOKENIZER" \
  --num-frames "${FRAMES:-512}" --group-size "${G:-8}" --train-iters "${ITERS:-1000}" ${PRECISION---bf16} "$@"
