"""Frame-index semantics: pure index math, then real encoded files of several lengths and rates."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from megatron_longvideo.data.sampling import (
    FrameSamplingConfig,
    rate_frame_indices,
    sample_frame_indices,
    uniform_frame_indices,
)
from megatron_longvideo.data.video import decode_video, probe_video

from .conftest import read_index


@pytest.mark.parametrize("num_video_frames", [1, 7, 64, 100, 1001, 20000])
@pytest.mark.parametrize("num_frames", [1, 3, 16, 64, 8192])
def test_uniform_indices_are_segment_centres(num_video_frames, num_frames):
    idx = uniform_frame_indices(num_video_frames, num_frames)
    assert len(idx) == min(num_frames, num_video_frames)
    assert all(b > a for a, b in zip(idx, idx[1:])), "strictly increasing, no duplicates"
    t = len(idx)
    for k, i in enumerate(idx):
        # frame i is the one on screen at the centre of segment k (frame i spans [i, i + 1))
        centre = (k + 0.5) * num_video_frames / t
        assert i <= centre < i + 1


@pytest.mark.parametrize("num_video_frames,video_fps", [(100, 25), (1000, Fraction(30000, 1001)), (37, 8), (9000, 60)])
@pytest.mark.parametrize("fps", [0.5, 1, 2.5, 100])
def test_rate_indices(num_video_frames, video_fps, fps):
    max_frames = 64
    idx = rate_frame_indices(num_video_frames, video_fps, fps, max_frames)
    duration = num_video_frames / float(video_fps)
    want = max(1, math.floor(duration * min(fps, float(video_fps)) + 1e-9))
    if want > max_frames:
        assert idx == uniform_frame_indices(num_video_frames, max_frames)
        return
    assert len(idx) == want
    assert all(b > a for a, b in zip(idx, idx[1:]))
    step = 1 / min(fps, float(video_fps))
    for k, i in enumerate(idx):
        t = (k + 0.5) * step
        # frame i is the one on screen at time t: i / r <= t < (i + 1) / r
        assert i / float(video_fps) <= t + 1e-9 and t < (i + 1) / float(video_fps) + 1e-9 or i == num_video_frames - 1


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="exactly one of num_frames and fps"):
        FrameSamplingConfig(num_frames=8, fps=1.0)
    with pytest.raises(ValueError, match="num_frames"):
        FrameSamplingConfig(num_frames=8193)
    with pytest.raises(ValueError, match="max_frames"):
        FrameSamplingConfig(num_frames=None, fps=1.0, max_frames=0)
    with pytest.raises(ValueError, match="std"):
        FrameSamplingConfig(std=(0.5, 0.0, 0.5))


@pytest.mark.parametrize("num_video_frames,fps", [(30, Fraction(8)), (100, Fraction(25)), (257, Fraction(30000, 1001))])
@pytest.mark.parametrize("request_kind", ["num_frames", "fps"])
def test_decoded_frames_are_the_sampled_indices(index_video, num_video_frames, fps, request_kind):
    """On real H.264 files, the frame returned for index i shows the number i (read back from pixels)."""
    path = index_video(num_video_frames, fps)
    info = probe_video(path)
    assert info.num_frames == num_video_frames and info.fps == fps
    if request_kind == "num_frames":
        cfg = FrameSamplingConfig(num_frames=12, image_size=64)
    else:
        cfg = FrameSamplingConfig(num_frames=None, fps=3.0, max_frames=20, image_size=64)
    out = decode_video(path, cfg)
    expected = sample_frame_indices(num_video_frames, fps, cfg)
    assert out.indices == expected
    assert out.frames.shape == (len(expected), 3, 64, 64)
    assert [read_index(f) for f in out.frames] == expected
    assert out.timestamps == pytest.approx([i / float(fps) for i in expected])


def test_more_frames_than_the_video_has(index_video):
    path = index_video(30, Fraction(8))
    out = decode_video(path, FrameSamplingConfig(num_frames=100, image_size=64))
    assert out.indices == list(range(30))
    assert [read_index(f) for f in out.frames] == list(range(30))


def test_resize_and_normalisation(index_video):
    path = index_video(30, Fraction(8))
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    out = decode_video(path, FrameSamplingConfig(num_frames=4, image_size=24, mean=mean, std=std))
    assert out.frames.shape == (4, 3, 24, 24) and out.frames.dtype.is_floating_point
    for c in range(3):  # black (0) and white (255) blocks map to (0 - m) / s and (1 - m) / s
        assert out.frames[:, c].min().item() == pytest.approx((0 - mean[c]) / std[c], abs=0.05 / std[c])
        assert out.frames[:, c].max().item() == pytest.approx((1 - mean[c]) / std[c], abs=0.05 / std[c])
