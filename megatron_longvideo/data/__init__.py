"""Data path: LongVideo-Reason records and synthetic videos -> frames, prompts and targets.

Modules, one idea each:
- ``records``: read and validate question / caption records (``RecordError`` names file:line field).
- ``sampling``: which frame indices a request takes (``num_frames`` uniform or ``fps`` + ``max_frames``).
- ``video`` / ``backends``: probe, decode (PyAV, decord, DALI), resize and normalise frames.
- ``tokenizer``: one interface over sentencepiece and Hugging Face tokenizers; small-model training.
- ``prompts``: the chat template, SFT targets, RL prompts with ground truth.
- ``dataset`` / ``sampler`` / ``loader`` / ``cache``: map-style dataset, DP-aware resumable sampler,
  batches, pre-decode cache.
- ``synthetic``: synthetic coloured-shape videos and questions (``tools/make_synthetic_dataset.py``).
- ``builder``: question-reasoning-answer records from clip captions through an OpenAI-compatible chat
  endpoint (``tools/build_reasoning_dataset.py``).

Importing this package imports neither megatron, decord nor DALI.
"""

from megatron_longvideo.data.cache import predecode
from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
from megatron_longvideo.data.errors import RecordError, SkipReport, VideoDecodeError
from megatron_longvideo.data.loader import ResumableDataLoader, VideoBatchCollator
from megatron_longvideo.data.prompts import (
    IGNORE_INDEX,
    GroundTruth,
    PromptConfig,
    TokenizedExample,
    build_caption_example,
    build_rl_prompt,
    build_sft_example,
    format_response,
    resolve_num_video_tokens,
)
from megatron_longvideo.data.records import CaptionRecord, RecordSet, VideoQARecord, load_records
from megatron_longvideo.data.sampler import DistributedVideoSampler
from megatron_longvideo.data.sampling import (
    FrameSamplingConfig,
    rate_frame_indices,
    sample_frame_indices,
    uniform_frame_indices,
)
from megatron_longvideo.data.synthetic import SyntheticDatasetConfig, make_synthetic_dataset
from megatron_longvideo.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    SpecialTokens,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
    train_tokenizer_for_records,
)
from megatron_longvideo.data.video import DecodedVideo, VideoInfo, decode_video, probe_video

__all__ = [
    "IGNORE_INDEX", "CaptionRecord", "DecodedVideo", "DistributedVideoSampler", "FrameSamplingConfig",
    "GroundTruth", "HFTokenizer", "LongVideoDataset", "PromptConfig", "RecordError", "RecordSet",
    "ResumableDataLoader", "SentencePieceTokenizer", "SkipReport", "SpecialTokens", "SyntheticDatasetConfig",
    "TokenizedExample", "Tokenizer", "VideoBatchCollator", "VideoDatasetConfig", "VideoDecodeError",
    "VideoInfo", "VideoQARecord", "build_caption_example", "build_rl_prompt", "build_sft_example",
    "decode_video", "format_response", "load_records", "load_tokenizer", "make_synthetic_dataset",
    "predecode", "probe_video", "rate_frame_indices", "resolve_num_video_tokens", "sample_frame_indices",
    "train_sentencepiece", "train_tokenizer_for_records", "uniform_frame_indices",
]
