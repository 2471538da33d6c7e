"""CoT-SFT of the video-language model on reasoning records (loss on the response tokens only).

Each question record becomes ``<video> question -> <think>reasoning</think><answer>X</answer><|im_end|>``;
the prompt, the video placeholders and the padding carry no loss. Long videos use the MR-SP layout: the
frames of a video are encoded in parallel over the ranks that hold the sample (``--encode-group``) and the
merged sequence is sharded over ``--context-parallel-size`` ranks. The LLM and the projector are trained,
the vision tower is frozen (``--train-vision-tower`` trains it too). Start from a projector-pretraining
checkpoint with ``--load PRETRAIN_DIR --finetune`` (its weights only; fresh optimizer and step count).
``--pack-sequences`` packs each micro-batch's samples into one row (first-fit rows of ``--seq-length``
when set) instead of padding them: each sample attends to itself only and its positions restart, so the
loss and gradients are those of padded rows (``training/packing.py``). ``--model-family qwen2_audio``
trains the audio family on audio and text records (``--vision-*`` shape its encoder, ``--audio-num-mel-bins``
and ``--audio-window-seconds`` its input). Leaves out: the RL stage (see the GRPO script).

CPU demo (2 ranks, context parallelism 2, the synthetic dataset written on first use):

    torchrun --nproc-per-node 2 examples/sft.py --synthetic-data demo/data --context-parallel-size 2 \\
        --train-iters 60 --lr 1e-3 --load demo/pretrain --finetune --save demo/sft

(measured on 2 CPU cores: response loss 6.20 at step 1 -> 3.37 at step 60, about 20 s in all).

One GPU machine, 8 ranks (a real model: pass its sizes, tokenizer and data):

    torchrun --nproc-per-node 8 examples/sft.py --tensor-model-parallel-size 2 --context-parallel-size 4 \\
        --sequence-parallel --cp-comm-type a2a --data-path DATA/qa.jsonl --video-root DATA/videos \\
        --tokenizer TOKENIZER --fps 1 --max-frames 1024 --micro-batch-size 1 --global-batch-size 64 \\
        --lr 1e-5 --train-iters 2000 --save CKPT/sft --load CKPT/pretrain --finetune --save-interval 200

``--config run.json`` takes any of the flags as a JSON object. ``examples/scripts/sft.sh`` wraps this.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megatron_longvideo.training.args import parse  # noqa: E402
from megatron_longvideo.training.stage import run_stage  # noqa: E402

DEFAULTS = {"lr": 1e-4, "lr_warmup_iters": 0, "lr_decay_style": "cosine"}


def main(argv=None):
    args = parse(argv, description=__doc__.splitlines()[0], defaults=DEFAULTS)
    return run_stage("sft", args)


if __name__ == "__main__":
    from megatron_longvideo.training.launch import run_script  # one error line per run; tracebacks in logs/

    sys.exit(run_script(main, name="sft"))
