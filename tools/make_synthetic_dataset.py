"""Write a synthetic long-video dataset: coloured-shape videos, questions, captions, a tokenizer.

Each video shows one coloured shape on a grey background for a stretch of frames; ``qa.jsonl`` asks
its colour (multiple choice, with a reasoning string for CoT-SFT), ``captions.jsonl`` describes it
(projector pretraining), and ``tokenizer.model`` is a small sentencepiece model trained on the text with
LLaVA-OneVision's chat tokens (``tokenizer_qwen2_5_vl.model``, ``tokenizer_qwen2_audio.model``: the same
with Qwen2.5-VL's and Qwen2-Audio's). ``--tasks`` adds other kinds: an image question, a two-video
question, a text-only sum (a mixed dataset), and ``audio``: beside each video a tone (a 16 kHz WAV of
1.5 to 2.5 s, 220 or 1760 Hz) and the question "Is the tone high or low? A. low B. high", for
``--model-family qwen2_audio`` (which takes audio and text records only: ``--tasks audio,text``).
Deterministic for a seed.

    python tools/make_synthetic_dataset.py --out /tmp/synth --num-videos 64
    python tools/make_synthetic_dataset.py --out /tmp/mixed --tasks colour,image,two_videos,text
    python tools/make_synthetic_dataset.py --out /tmp/audio --tasks audio,text   # tokenizer_qwen2_audio.model
    python tools/make_synthetic_dataset.py --out /tmp/synth_vp9 --codec vp9   # for DALI's CPU decoder

Importable: ``from make_synthetic_dataset import make_dataset`` (this folder on ``sys.path``), or use
``megatron_longvideo.data.synthetic`` directly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_longvideo.data.records import load_records
from megatron_longvideo.data.synthetic import (
    CODECS,
    TASKS,
    SyntheticDataset,
    SyntheticDatasetConfig,
    make_synthetic_dataset,
)
from megatron_longvideo.data.tokenizer import train_tokenizer_for_records


def make_dataset(out_dir: str, config: SyntheticDatasetConfig | None = None, *, tokenizer_vocab_size: int = 512,
                 ) -> tuple[SyntheticDataset, str]:
    """Videos + ``qa.jsonl`` + ``captions.jsonl`` + a tokenizer per model family under ``out_dir``; returns
    the dataset and the LLaVA-OneVision tokenizer (``tokenizer.model``)."""
    from megatron_longvideo.models import FAMILIES, special_tokens

    ds = make_synthetic_dataset(out_dir, config)
    records = load_records(ds.qa_path).records + load_records(ds.caption_path, kind="caption").records
    models = [train_tokenizer_for_records(records, os.path.join(out_dir, tokenizer_name(family)[: -len(".model")]),
                                          vocab_size=tokenizer_vocab_size, special=special_tokens(family))
              for family in FAMILIES]
    return ds, models[0]


def tokenizer_name(family: str) -> str:
    """The file name of the synthetic data's tokenizer for a model family."""
    return "tokenizer.model" if family == "llava_onevision" else f"tokenizer_{family}.model"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-videos", type=int, default=32)
    p.add_argument("--min-frames", type=int, default=48)
    p.add_argument("--max-frames", type=int, default=96)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="frame width and height in pixels")
    p.add_argument("--codec", choices=sorted(CODECS), default="h264")
    p.add_argument("--tasks", default="colour", help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=512, help="sentencepiece vocabulary size")
    args = p.parse_args(argv)
    try:
        cfg = SyntheticDatasetConfig(num_videos=args.num_videos, min_frames=args.min_frames,
                                     max_frames=args.max_frames, fps=args.fps, size=args.size, codec=args.codec,
                                     tasks=tuple(t for t in args.tasks.split(",") if t), seed=args.seed)
    except ValueError as e:
        p.error(str(e))
    start = time.monotonic()
    ds, model = make_dataset(args.out, cfg, tokenizer_vocab_size=args.vocab_size)
    print(f"wrote {len(ds.video_paths)} videos to {ds.video_root}, {ds.qa_path}, {ds.caption_path}, {model} "
          f"in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
