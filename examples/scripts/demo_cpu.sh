#!/usr/bin/env bash
# The CPU demo: synthetic coloured-shape videos, a tiny model and tokenizer, GRPO on 2 CPU ranks with
# context parallelism (CP=2) and shared-prefix packing. A few minutes on 2 cores. Writes
# TensorBoard logs to demo_out/tb and a checkpoint to demo_out/ckpt.
#
#   bash examples/scripts/demo_cpu.sh            # set up (pip) and run
#   SKIP_INSTALL=1 bash examples/scripts/demo_cpu.sh
# A second run resumes from demo_out/ckpt (and has nothing left to do at step 300): delete demo_out to start over.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-demo_out}
if [ -z "${SKIP_INSTALL:-}" ]; then
  python -m pip install -q torch==2.13.0
  python -m pip install -q setuptools wheel
  python -m pip install -q --no-build-isolation -e .
fi
# the tokenizer with the chat tokens of the model family (--model-family, default llava_onevision)
TOKENIZER="$OUT/data/tokenizer.model"
prev=""
for a in "$@"; do
  case "$prev=$a" in --model-family=qwen2_5_vl|*=--model-family=qwen2_5_vl) TOKENIZER="$OUT/data/tokenizer_qwen2_5_vl.model" ;; esac
  prev="$a"
done
[ -f "$TOKENIZER" ] || python tools/make_synthetic_dataset.py --out "$OUT/data" --num-videos 64
torchrun --nproc-per-node 2 examples/train_grpo.py \
  --context-parallel-size 2 \
  --data-path "$OUT/data/qa.jsonl" --video-root "$OUT/data/videos" --tokenizer "$TOKENIZER" \
  --num-frames 8 --sft-warmup-steps "${WARMUP:-100}" --train-iters "${ITERS:-300}" \
  --group-size 8 --prompts-per-step 8 --lr 1e-3 --dynamic-sampling \
  --tensorboard-dir "$OUT/tb" --save "$OUT/ckpt" --save-interval 100 --log-samples-every 50 "$@"
