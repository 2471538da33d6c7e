"""Projector alignment (stage 1) of the video-language model on caption records.

Each caption record becomes ``<video> Describe the video. -> caption<|im_end|>`` with the loss on the
caption. The LLM and the vision tower are frozen: only the projector (and the video newline embedding)
learn to map frame features into the LLM's embedding space. The checkpoint it writes is the start of
CoT-SFT (``examples/sft.py --load THIS --finetune``). Parallel encoding, context parallelism and sequence
packing (``--pack-sequences``: short captions share a row, none seeing another) work as in SFT. Leaves
out: interleaved image-text data, multi-video records, and the audio family (``--model-family qwen2_audio``
is refused: the caption records describe videos; train it with ``examples/sft.py``).

CPU demo (2 ranks, the synthetic dataset written on first use):

    torchrun --nproc-per-node 2 examples/pretrain.py --synthetic-data demo/data --context-parallel-size 2 \\
        --train-iters 30 --lr 1e-3 --save demo/pretrain --log-interval 5

One GPU machine, 8 ranks:

    torchrun --nproc-per-node 8 examples/pretrain.py --tensor-model-parallel-size 2 \\
        --data-path DATA/captions.jsonl --video-root DATA/videos --tokenizer TOKENIZER --num-frames 32 \\
        --micro-batch-size 4 --global-batch-size 256 --lr 1e-3 --train-iters 2000 --save CKPT/pretrain

``--config run.json`` takes any of the flags as a JSON object. ``examples/scripts/pretrain.sh`` wraps this.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_longvideo.training.args import parse  # noqa: E402
from megatron_longvideo.training.stage import run_stage  # noqa: E402

DEFAULTS = {"lr": 1e-3, "lr_warmup_iters": 0, "lr_decay_style": "cosine"}


def main(argv=None):
    args = parse(argv, description=__doc__.splitlines()[0], defaults=DEFAULTS)
    return run_stage("pretrain", args)


if __name__ == "__main__":
    from megatron_longvideo.training.launch import run_script  # one error line per run; tracebacks in logs/

    sys.exit(run_script(main, name="pretrain"))
