"""Shared fixtures: real encoded videos made with the synthetic tool, and a small tokenizer."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest

from megatron_longvideo.data.records import load_records
from megatron_longvideo.data.synthetic import SyntheticDatasetConfig, make_synthetic_dataset, write_video
from megatron_longvideo.data.tokenizer import load_tokenizer, train_tokenizer_for_records

CODE_GRID = 4
"""Index-coded videos show their frame index as a 4 x 4 grid of black / white blocks (16 bits)."""


def index_frame(index: int, size: int = 64) -> np.ndarray:
    """[size, size, 3] uint8 whose blocks spell ``index`` in binary (block k = bit k, row-major)."""
    block = size // CODE_GRID
    frame = np.zeros((size, size, 3), dtype=np.uint8)
    for bit in range(CODE_GRID * CODE_GRID):
        if index >> bit & 1:
            r, c = divmod(bit, CODE_GRID)
            frame[r * block : (r + 1) * block, c * block : (c + 1) * block] = 255
    return frame


def read_index(frame_chw) -> int:
    """Inverse of ``index_frame`` on a decoded [3, S, S] frame in any value range (thresholds at mid)."""
    x = np.asarray(frame_chw, dtype=np.float64).mean(axis=0)  # [S, S]
    lo, hi = x.min(), x.max()
    size = x.shape[0]
    block = size // CODE_GRID
    value = 0
    for bit in range(CODE_GRID * CODE_GRID):
        r, c = divmod(bit, CODE_GRID)
        centre = x[r * block + block // 4 : (r + 1) * block - block // 4, c * block + block // 4 : (c + 1) * block - block // 4]
        if hi > lo and centre.mean() > (lo + hi) / 2:
            value |= 1 << bit
    return value


@pytest.fixture(scope="session")
def index_video(tmp_path_factory):
    """``make(num_frames, fps, codec) -> path`` of an index-coded video, written once per parameters."""
    root = tmp_path_factory.mktemp("index_videos")
    made: dict = {}

    def make(num_frames: int, fps=Fraction(8), codec: str = "h264") -> str:
        key = (num_frames, Fraction(fps), codec)
        if key not in made:
            ext = {"h264": "mp4", "vp9": "webm", "mjpeg": "mkv"}[codec]
            path = os.path.join(root, f"idx_{num_frames}_{Fraction(fps).numerator}_{Fraction(fps).denominator}.{ext}")
            write_video(path, (index_frame(i) for i in range(num_frames)), fps=fps, codec=codec)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """8 short H.264 synthetic videos with all three question kinds, and captions."""
    out = tmp_path_factory.mktemp("synth")
    return make_synthetic_dataset(str(out), SyntheticDatasetConfig(num_videos=8, min_frames=24, max_frames=48,
                                                                   tasks=("colour", "shape", "count"), seed=3))


@pytest.fixture(scope="session")
def tokenizer(synth, tmp_path_factory):
    records = load_records(synth.qa_path).records + load_records(synth.caption_path, kind="caption").records
    model = train_tokenizer_for_records(records, str(tmp_path_factory.mktemp("tok") / "spm"), vocab_size=512)
    return load_tokenizer(model)


def has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # parent package missing (e.g. nvidia without dali)
        return False


requires_decord = pytest.mark.skipif(not has_module("decord"), reason="decord not installed (pip install decord)")
requires_dali = pytest.mark.skipif(
    not has_module("nvidia.dali"), reason="NVIDIA DALI not installed (pip install megatron_longvideo[dali])"
)
