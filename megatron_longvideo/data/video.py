"""Decode sampled frames of one video into vision-tower input, with a choice of backend.

``decode_video(path, config, backend=...)`` probes the file (PyAV, always: one source of frame count
and rate, so every backend samples the same indices, see ``sampling``), picks the indices, and asks
the backend for exactly those frames as RGB uint8. Each frame is resized and written into a
preallocated output as it arrives: no backend ever holds all full-resolution frames of a video.

Backends (RGB uint8 frames in; same index math, same resize and normalisation):
- ``pyav`` (default): seeks to the keyframe before each far-ahead sampled frame and decodes forward
  from there, converting only the sampled frames; frames are identified by pts against the stream's
  packets, so they are bit-identical to sequential decoding (``seek=False``), which is kept for files
  whose packets cannot name every frame (see ``backends.iter_frames_pyav``).
- ``decord`` (optional, ``pip install decord``): ``get_batch`` in small chunks (decord seeks itself).
  Its seeks are not exact on open-GOP H.264: there it returned frames up to three indices late
  (``tests/data/test_seek_decoding.py``).
- ``dali`` (optional, ``pip install megatron_longvideo[dali]``): NVDEC on a CUDA machine, otherwise
  DALI's CPU decoder, which reads VP8, VP9 and MJPEG only.

Agreement: pyav and decord use the same FFmpeg colour conversion and return identical frames (tested
bit-exact on our closed-GOP fixtures). DALI converts YUV to RGB itself; after resize and normalisation
its frames agree with pyav within a mean absolute difference of 0.03 and a max of 0.6 (normalised
units, std 0.5), the differences sitting on sharp colour edges (chroma upsampling).
"""

from __future__ import annotations

import dataclasses
import os
from fractions import Fraction

import torch
import torch.nn.functional as F

from megatron_longvideo.data.backends import StreamEndedEarly
from megatron_longvideo.data.errors import VideoDecodeError
from megatron_longvideo.data.sampling import FrameSamplingConfig, frame_timestamps, sample_frame_indices

BACKENDS = ("pyav", "decord", "dali")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the probe learned about a file's first video stream."""

    path: str
    num_frames: int
    fps: Fraction
    width: int
    height: int
    codec: str


@dataclasses.dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames ready for the vision tower, and where they came from."""

    frames: torch.Tensor
    """[T, 3, S, S] float32, resized and normalised."""
    indices: list[int]
    """Frame index of each output frame (see ``sampling`` for the semantics)."""
    timestamps: list[float]
    """Display time in seconds of each output frame."""
    info: VideoInfo


def probe_video(path: str, *, max_frame_side: int = 4096, strict_frame_count: bool = True) -> VideoInfo:
    """Open ``path`` with PyAV and describe its first video stream, or raise ``VideoDecodeError``.

    Checks, each with its own message: the file exists, is not empty, is a media container, has a
    video stream, that stream's codec has a decoder, the frame size is within ``max_frame_side``.
    Frame count comes from the container header; where the container has none (WebM, MKV) the
    packets are counted (demuxing only, no decoding), and with ``strict_frame_count`` a count well
    short of the header's duration is reported as truncation.
    """
    import av

    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if os.path.isdir(path):
        raise VideoDecodeError(path, "is a directory, expected a video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes)")
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise VideoDecodeError(
            path, f"not a readable video container (truncated, corrupt or not a video: {e.strerror})"
        ) from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoDecodeError(path, f"no video stream (streams found: {', '.join(kinds)})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None:
            raise VideoDecodeError(path, "unsupported codec: FFmpeg has no decoder for its video stream")
        width, height = ctx.width, ctx.height
        if width <= 0 or height <= 0:
            raise VideoDecodeError(path, f"video stream has no frame size ({width}x{height})")
        if max(width, height) > max_frame_side:
            raise VideoDecodeError(
                path, f"frame size {width}x{height} exceeds the limit max_frame_side={max_frame_side}"
            )
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or rate <= 0:
            raise VideoDecodeError(path, "video stream has no frame rate")
        num_frames = stream.frames
        if not num_frames:
            try:
                num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
            except av.error.FFmpegError as e:
                raise VideoDecodeError(path, f"corrupt container while counting packets: {e.strerror}") from None
            # A header duration but fewer packets than it implies: the file was cut short. Matroska's
            # duration runs from time 0, not from the first timestamp, so a stream starting late
            # would look truncated; the start is taken off (a container whose duration already
            # excludes it then gets a laxer check, never a false alarm).
            span = (container.duration or 0) - max(container.start_time or 0, 0)
            if span > 0 and strict_frame_count:
                declared = int(Fraction(span, 1_000_000) * Fraction(rate))
                if num_frames < declared - max(2, declared // 50):
                    raise VideoDecodeError(
                        path, f"truncated or corrupt: the header's duration implies {declared} frames "
                              f"but the stream holds {num_frames}")
        if num_frames <= 0:
            raise VideoDecodeError(path, "video stream has no frames")
        return VideoInfo(path=path, num_frames=int(num_frames), fps=Fraction(rate), width=width,
                         height=height, codec=ctx.name)


def resize_frames(rgb: torch.Tensor, size, *, mode: str = "bilinear") -> torch.Tensor:
    """[n, H, W, 3] uint8 -> [n, 3, h, w] uint8 (channels-last memory), antialiased; ``size`` is a side
    (square) or ``(h, w)``.

    Bilinear resizing stays in uint8 (torch's vectorised uint8 kernel, about 10x faster than float on CPU,
    and like image processors that resize uint8 images); a cached uint8 copy is then identical to a fresh
    decode. ``mode="bicubic"`` (qwen-vl-utils) resizes through floats and rounds, as torchvision does for
    uint8. Every backend goes through this one function.
    """
    x = rgb.permute(0, 3, 1, 2)  # [n, 3, H, W], a channels-last view
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if mode == "bicubic":
        if x.shape[-2:] == (h, w):
            return x
        y = F.interpolate(x.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        return y.round_().clamp_(0, 255).to(torch.uint8)
    if x.shape[-2:] != (h, w):
        if x.device.type == "cpu":
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        else:  # GPU-decoded frames: torch's antialiased resize takes floats on CUDA
            x = resize_uint8_via_float(x, (h, w))
    return x


def resize_uint8_via_float(x: torch.Tensor, size) -> torch.Tensor:
    """``[n, 3, H, W]`` uint8 -> ``[n, 3, size, size]`` (or ``size = (h, w)``) uint8 through a float resize,
    rounded (the path of frames decoded on a GPU; on the CPU it agrees with the uint8 kernel to one grey level)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    y = F.interpolate(x.float(), size=hw, mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def normalize_frames(frames: torch.Tensor, config: FrameSamplingConfig) -> torch.Tensor:
    """In place: [T, 3, S, S] on the 0..255 scale -> (x / 255 - mean) / std, float32."""
    mean = torch.tensor(config.mean, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    return frames.div_(255.0).sub_(mean).div_(std)


def _iter_backend(backend: str, info: VideoInfo, indices: list[int], seek: bool = True):
    from megatron_longvideo.data import backends  # optional backends import their library lazily

    if backend == "pyav":
        return backends.iter_frames_pyav(info, indices, seek=seek)
    if backend == "decord":
        return backends.iter_frames_decord(info, indices)
    if backend == "dali":
        return backends.iter_frames_dali(info, indices)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def decode_resized_uint8(path: str, config: FrameSamplingConfig, *, backend: str = "pyav", seek: bool = True):
    """Sampled, resized frames before normalisation: ``([T, 3, S, S] uint8, indices, info)``."""
    return _decode(path, config, backend, torch.uint8, seek)


def decode_video(path: str, config: FrameSamplingConfig, *, backend: str = "pyav", seek: bool = True) -> DecodedVideo:
    """Decode the frames ``config`` samples from ``path`` (see module docstring). ``seek=False`` makes
    the pyav backend decode every frame up to the last sampled one (the same frames, slower)."""
    frames, indices, info = _decode(path, config, backend, torch.float32, seek)
    return DecodedVideo(frames=normalize_frames(frames, config), indices=indices,
                        timestamps=frame_timestamps(indices, info.fps), info=info)


def _decode(path, config: FrameSamplingConfig, backend: str, dtype: torch.dtype, seek: bool = True):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    info = probe_video(path, max_frame_side=config.max_frame_side,
                       strict_frame_count=config.strict_frame_count)
    indices = sample_frame_indices(info.num_frames, info.fps, config)
    try:
        frames, got = _fill(backend, info, indices, config, dtype, seek)
    except StreamEndedEarly as short:
        if config.strict_frame_count or short.num_decoded == 0:
            raise VideoDecodeError(
                info.path,
                f"truncated or corrupt: the container declares {info.num_frames} frames but the stream "
                f"ended after {short.num_decoded}",
            ) from None
        info = dataclasses.replace(info, num_frames=short.num_decoded)
        indices = sample_frame_indices(info.num_frames, info.fps, config)
        frames, got = _fill(backend, info, indices, config, dtype, seek)
    assert got == len(indices), (got, len(indices))
    return frames, indices, info


def probe_lazy(path: str, config: FrameSamplingConfig, *, backend: str = "pyav"):
    """The frames ``decode_video`` would return, as a :class:`~megatron_longvideo.data.frames.LazyFrames`:
    probed and sampled now (every probe check runs here), decoded where they are used."""
    from megatron_longvideo.data.frames import LazyFrames

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    info = probe_video(path, max_frame_side=config.max_frame_side, strict_frame_count=config.strict_frame_count)
    indices = sample_frame_indices(info.num_frames, info.fps, config)
    return LazyFrames(info, indices, frame_size(info, len(indices), config), config, backend)


def frame_size(info: VideoInfo, num_frames: int, config: FrameSamplingConfig) -> tuple[int, int]:
    """``(h, w)`` the sampled frames are resized to: ``image_size`` square, or qwen-vl-utils' sizing."""
    if config.style == "qwen_vl":
        from megatron_longvideo.data.sampling import qwen_vl_frame_size

        return qwen_vl_frame_size(info.height, info.width, num_frames, config)
    return config.image_size, config.image_size


def _fill(backend: str, info: VideoInfo, indices: list[int], config: FrameSamplingConfig, dtype: torch.dtype,
          seek: bool = True):
    h, w = frame_size(info, len(indices), config)
    mode = "bicubic" if config.style == "qwen_vl" else "bilinear"
    out = None  # [T, 3, h, w], on the device the backend decodes to (the host, or the GPU for DALI's NVDEC)
    pos = 0
    for chunk in _iter_backend(backend, info, indices, seek):  # [n, H, W, 3] uint8
        if out is None:
            out = torch.empty(len(indices), 3, h, w, dtype=dtype, device=chunk.device)
        n = chunk.shape[0]
        out[pos : pos + n] = resize_frames(chunk, (h, w), mode=mode)
        pos += n
    if out is None:
        out = torch.empty(len(indices), 3, h, w, dtype=dtype, device="cpu")
    return out, pos


def decode_image(path: str, config: FrameSamplingConfig) -> DecodedVideo:
    """An image file as a one-frame video ``[1, 3, S, S]`` (resized and normalised as frames are), read by
    PyAV (PNG, JPEG, WebP, BMP, ... whatever FFmpeg's image demuxers read); every probe check of
    :func:`probe_video` applies. A video file given as an image gives its first frame."""
    info = probe_video(path, max_frame_side=config.max_frame_side, strict_frame_count=False)
    try:
        frames, got = _fill("pyav", info, [0], config, torch.float32, seek=False)
    except StreamEndedEarly:
        got = 0
    if got != 1:
        raise VideoDecodeError(info.path, "image: no frame could be decoded (truncated or corrupt)")
    return DecodedVideo(frames=normalize_frames(frames, config), indices=[0], timestamps=[0.0], info=info)
