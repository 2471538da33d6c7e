"""Which frames of a video are sampled: pure index math shared by every decoding backend.

Frame indices are 0-based positions in presentation (display) order over the frames the video
stream decodes to; ``num_video_frames`` is that count. Every backend first computes the indices here
from the same probe (frame count and average frame rate) and then fetches exactly those frames, so
backends agree on indices exactly; only pixel values may differ (colour conversion).

Uniform sampling (``num_frames=T``, video of ``N`` frames): split the video into ``T`` equal segments
and take the frame at each segment's centre, ``i_k = floor((2k + 1) * N / (2T))`` for ``k = 0..T-1``,
computed in exact integer arithmetic. If ``T >= N`` every frame is taken once (``0..N-1``): frames are
never duplicated, so the caller sees ``min(T, N)`` frames.

Rate sampling (``fps=f``, video at average rate ``r``): sample times ``t_k = (k + 0.5) / f`` for every
``t_k`` inside the video's duration ``N / r``, i.e. ``K = floor(N * f / r)`` samples (at least 1), each
mapped to the frame shown at that time, ``i_k = floor(t_k * r)``, computed exactly with ``Fraction``.
If ``K > max_frames``, the request falls back to uniform sampling of ``max_frames`` frames, so the whole
video is still covered. ``f >= r`` takes every frame.

The timestamp of frame ``i`` is ``i / r`` seconds (the frame's nominal display time).

``style="qwen_vl"`` follows qwen-vl-utils, which Qwen2.5-VL was trained with: an even frame count
(``num_frames`` rounded to even, or ``N / r * fps`` clamped to ``[min_frames, max_frames]`` and the video,
floored to even), taken at ``linspace(0, N - 1, count)`` rounded; and frames resized (bicubic,
antialiased) keeping their aspect ratio to multiples of ``size_factor`` (28) with a pixel count in
``[min_pixels, max_pixels]``, the upper bound also shrinking with the frame count so that a video fits
``total_pixels`` (:func:`qwen_vl_frame_size`). Checked against qwen-vl-utils 0.0.14 itself.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

MAX_FRAMES_LIMIT = 8192
"""The largest number of frames one request may ask for (the long-video inference setting)."""

DEFAULT_NUM_FRAMES = 64
"""Frames taken by uniform sampling when a config sets neither ``num_frames`` nor ``fps``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrameSamplingConfig:
    """How many frames to take from a video, and how to prepare them for the vision tower."""

    num_frames: int | None = None
    """Uniform sampling over the whole video: take this many frames (fewer if the video is shorter).
    At most one of ``num_frames`` and ``fps`` is set; with neither, ``DEFAULT_NUM_FRAMES`` (64)."""

    fps: float | None = None
    """Rate sampling: take frames at this many per second, capped by ``max_frames``. ``fps=2.0`` alone
    selects it; ``dataclasses.replace`` of a uniform config to ``fps`` also passes ``num_frames=None``."""

    max_frames: int = 512
    """Upper bound on frames for rate sampling; beyond it, uniform sampling of ``max_frames``."""

    image_size: int = 384
    """Frames are resized (bilinear, antialiased) to a square of this many pixels per side."""

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel mean (RGB, on the 0..1 scale) subtracted after resizing (SigLIP uses 0.5)."""

    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel standard deviation (RGB, 0..1 scale) the frames are divided by."""

    max_frame_side: int = 4096
    """A video whose width or height exceeds this many pixels is rejected before decoding."""

    strict_frame_count: bool = True
    """If the stream decodes to fewer frames than its container declares, raise (truncated or corrupt
    file). If False, sample again over the frames that do decode (costs a second pass)."""

    style: str = "default"
    """'default': the index math above and square ``image_size`` frames; 'qwen_vl': qwen-vl-utils'
    frame count, indices and aspect-keeping resize (see the module docstring)."""

    min_frames: int = 4
    """'qwen_vl' with ``fps``: fewest frames (qwen-vl-utils' FPS_MIN_FRAMES)."""

    min_pixels: int = 128 * 28 * 28
    """'qwen_vl': fewest pixels per frame after resizing (VIDEO_MIN_TOKEN_NUM x 28 x 28)."""

    max_pixels: int = 768 * 28 * 28
    """'qwen_vl': most pixels per frame after resizing (VIDEO_MAX_TOKEN_NUM x 28 x 28)."""

    total_pixels: int = int(128000 * 28 * 28 * 0.9)
    """'qwen_vl': pixel budget of a whole video (qwen-vl-utils' default for a 128k-token model)."""

    size_factor: int = 28
    """'qwen_vl': frame sides are multiples of this (patch 14 x spatial merge 2)."""

    def __post_init__(self):
        if self.num_frames is not None and self.fps is not None:
            raise ValueError(
                f"exactly one of num_frames and fps may be set (uniform or rate sampling), got "
                f"num_frames={self.num_frames}, fps={self.fps}"
            )
        if self.fps is None and self.num_frames is None:
            # resolved here, not left None, so the config (and the cache key made from it) says what is sampled
            object.__setattr__(self, "num_frames", DEFAULT_NUM_FRAMES)
        if self.num_frames is not None and not 1 <= self.num_frames <= MAX_FRAMES_LIMIT:
            raise ValueError(f"num_frames must be in [1, {MAX_FRAMES_LIMIT}], got {self.num_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if not 1 <= self.max_frames <= MAX_FRAMES_LIMIT:
            raise ValueError(f"max_frames must be in [1, {MAX_FRAMES_LIMIT}], got {self.max_frames}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if len(self.mean) != 3:
            raise ValueError(f"mean must have 3 values (RGB), got {self.mean}")
        if len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"std must have 3 positive values (RGB), got {self.std}")
        if self.max_frame_side < 1:
            raise ValueError(f"max_frame_side must be >= 1, got {self.max_frame_side}")
        if self.style not in ("default", "qwen_vl"):
            raise ValueError(f"style must be 'default' or 'qwen_vl', got {self.style!r}")
        if self.style == "qwen_vl" and not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} must be positive and at most max_pixels={self.max_pixels}")


def uniform_frame_indices(num_video_frames: int, num_frames: int) -> list[int]:
    """Segment-centre indices of ``min(num_frames, num_video_frames)`` frames (see module docstring)."""
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames >= num_video_frames:
        return list(range(num_video_frames))
    return [(2 * k + 1) * num_video_frames // (2 * num_frames) for k in range(num_frames)]


def rate_frame_indices(
    num_video_frames: int, video_fps: Fraction | float, fps: float, max_frames: int
) -> list[int]:
    """Indices for ``fps`` samples per second, falling back to uniform beyond ``max_frames``."""
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}")
    rate = Fraction(video_fps)
    if rate <= 0:
        raise ValueError(f"video_fps must be > 0, got {video_fps}")
    want = min(Fraction(fps), rate)  # faster than the video itself: every frame once
    num_samples = max(1, int(num_video_frames * want / rate))  # floor(N * f / r)
    if num_samples > max_frames:
        return uniform_frame_indices(num_video_frames, max_frames)
    indices = [min(int((2 * k + 1) * rate / (2 * want)), num_video_frames - 1) for k in range(num_samples)]
    return indices


def _round_to(x: float, f: int) -> int:
    return round(x / f) * f


def _ceil_to(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor_to(x: float, f: int) -> int:
    return math.floor(x / f) * f


def qwen_vl_num_frames(num_video_frames: int, video_fps: Fraction | float, config: FrameSamplingConfig) -> int:
    """qwen-vl-utils' frame count (``smart_nframes``): even, within the video."""
    if config.num_frames is not None:
        count = _round_to(config.num_frames, 2)
    else:
        low = _ceil_to(config.min_frames, 2)
        high = _floor_to(min(config.max_frames, num_video_frames), 2)
        count = num_video_frames / float(video_fps) * config.fps
        count = _floor_to(min(max(count, low), high, num_video_frames), 2)
    if not 2 <= count <= num_video_frames:
        raise ValueError(f"style='qwen_vl' takes an even number of frames in [2, {num_video_frames}] from this "
                         f"video, got {count} (a video of one frame, or num_frames / min_frames past its length)")
    return count


def qwen_vl_frame_indices(num_video_frames: int, video_fps: Fraction | float, config: FrameSamplingConfig) -> list[int]:
    """``linspace(0, N - 1, count)`` rounded, as qwen-vl-utils reads a whole video."""
    import torch

    count = qwen_vl_num_frames(num_video_frames, video_fps, config)
    return torch.linspace(0, num_video_frames - 1, count).round().long().tolist()


def fit_to_factor(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: float) -> tuple[int, int]:
    """``(h, w)``: sides multiples of ``factor``, close to the aspect ratio, pixels within
    ``[min_pixels, max_pixels]`` (qwen-vl-utils' ``smart_resize``)."""
    f = factor
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200 ({width} x {height})")
    h, w = max(f, _round_to(height, f)), max(f, _round_to(width, f))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = _floor_to(height / beta, f), _floor_to(width / beta, f)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = _ceil_to(height * beta, f), _ceil_to(width * beta, f)
    return h, w


def qwen_vl_frame_size(height: int, width: int, num_frames: int, config: FrameSamplingConfig) -> tuple[int, int]:
    """``(h, w)`` a ``height x width`` video of ``num_frames`` sampled frames is resized to (qwen-vl-utils'
    video pixel limits: at most 768 x 28 x 28 per frame and ``total_pixels`` for the video)."""
    f = config.size_factor
    max_pixels = max(min(768 * f * f, config.total_pixels / num_frames * 2), int(config.min_pixels * 1.05))
    max_pixels = min(config.max_pixels, max_pixels)
    return fit_to_factor(height, width, factor=f, min_pixels=config.min_pixels, max_pixels=max_pixels)


def sample_frame_indices(num_video_frames: int, video_fps: Fraction | float, config: FrameSamplingConfig) -> list[int]:
    """The frame indices ``config`` selects from a video of ``num_video_frames`` at ``video_fps``."""
    if config.style == "qwen_vl":
        return qwen_vl_frame_indices(num_video_frames, video_fps, config)
    if config.num_frames is not None:
        return uniform_frame_indices(num_video_frames, config.num_frames)
    return rate_frame_indices(num_video_frames, video_fps, config.fps, config.max_frames)


def frame_timestamps(indices: list[int], video_fps: Fraction | float) -> list[float]:
    """Nominal display time in seconds of each frame index: ``i / video_fps``."""
    rate = Fraction(video_fps)
    return [float(i / rate) for i in indices]
