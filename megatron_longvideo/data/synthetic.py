"""Synthetic long videos with questions whose answers are in the pixels.

Each video is a plain grey background on which one coloured shape (square, disc or triangle) is
shown during one or more stretches of frames. The main question asks for the shape's colour
(multiple choice over red / green / blue / yellow), a task a tiny model can learn from the frames
with RL. Optional extra tasks: the shape (multiple choice, options as a list field) and how many
times it appears (numerical); a still image, two videos, a text-only sum, and a tone beside each video
(high or low? for the audio family; a 16 kHz WAV). Each question record carries a ``reasoning`` string
for CoT-SFT, and a caption record set serves projector pretraining.

The videos are real encoded files (H.264 in .mp4 by default; VP9 in .webm or MJPEG in .mkv for
DALI's CPU decoder) written with PyAV, so every test and demo exercises real decoding. Everything is
a function of ``seed``: the same config writes the same records and the same frames.

``tools/make_synthetic_dataset.py`` is the command-line front end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from fractions import Fraction

import numpy as np

from megatron_longvideo.data.synthetic_audio import make_tone_audio

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 60, 230),
    "yellow": (235, 220, 30),
}
SHAPES: tuple[str, ...] = ("square", "disc", "triangle")
BACKGROUND = (128, 128, 128)
CODECS: dict[str, tuple[str, str, str]] = {
    # name: (PyAV encoder, container extension, pixel format)
    "h264": ("libx264", "mp4", "yuv420p"),
    "vp9": ("libvpx-vp9", "webm", "yuv420p"),
    "mjpeg": ("mjpeg", "mkv", "yuvj420p"),
}
TASKS = ("colour", "shape", "count", "image", "two_videos", "text", "audio")
PITCHES: dict[str, float] = {"low": 220.0, "high": 1760.0}
"""The tone of the ``audio`` task: its pitch name and frequency in Hz (three octaves apart)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticDatasetConfig:
    """What to generate: how many videos, how long, how large, which codec and which questions."""

    num_videos: int = 32
    """Number of video files (one colour question per video, plus one record per extra task)."""

    min_frames: int = 48
    """Fewest frames a video has; each video's length is drawn from [min_frames, max_frames]."""

    max_frames: int = 96
    """Most frames a video has."""

    fps: int = 8
    """Frame rate written into the container (frames per second)."""

    size: int = 32
    """Frame width and height in pixels (even, for 4:2:0 chroma)."""

    codec: str = "h264"
    """``h264`` (.mp4), ``vp9`` (.webm) or ``mjpeg`` (.mkv); DALI's CPU decoder needs vp9 or mjpeg."""

    tasks: tuple[str, ...] = ("colour",)
    """Question kinds to write: ``colour`` (multiple choice, options inline), ``shape`` (multiple
    choice, options as a list field), ``count`` (numerical: how many times the shape appears), ``image``
    (the colour of the shape in a still image of the video, a PNG), ``two_videos`` (the colour of the shape
    in the second of two videos: this one and the next), ``text`` (a text-only sum, numerical), ``audio``
    (whether a tone, a WAV of 1.5 to 2.5 s beside each video, is high or low: multiple choice, for the
    audio family)."""

    seed: int = 0
    """Everything (lengths, colours, shapes, positions, appearance times) is a function of this."""

    def __post_init__(self):
        if self.num_videos < 1:
            raise ValueError(f"num_videos must be >= 1, got {self.num_videos}")
        if self.min_frames < 4:
            raise ValueError(f"min_frames must be >= 4, got {self.min_frames}")
        if self.max_frames < self.min_frames:
            raise ValueError(f"max_frames must be >= min_frames ({self.min_frames}), got {self.max_frames}")
        if self.fps < 1:
            raise ValueError(f"fps must be >= 1, got {self.fps}")
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size must be an even number >= 16, got {self.size}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, got {self.codec!r}")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    """Where a generated dataset lives. Video paths in the records are relative to ``video_root``."""

    video_root: str
    qa_path: str
    caption_path: str
    video_paths: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _VideoPlan:
    num_frames: int
    colour: str
    shape: str
    x: int
    y: int
    side: int
    spans: tuple[tuple[int, int], ...]  # [start, end) frame ranges where the shape is shown


def _plan_video(rng: random.Random, cfg: SyntheticDatasetConfig) -> _VideoPlan:
    num_frames = rng.randint(cfg.min_frames, cfg.max_frames)
    side = max(6, int(cfg.size * rng.uniform(0.35, 0.55)))
    x = rng.randint(0, cfg.size - side)
    y = rng.randint(0, cfg.size - side)
    num_spans = rng.randint(1, 3) if "count" in cfg.tasks else 1
    # Split the video into num_spans equal parts and show the shape in the middle of each for at
    # least a quarter of the part, so uniform sampling of >= 4 frames per part always sees it.
    part = num_frames // num_spans
    spans = []
    for p in range(num_spans):
        length = rng.randint(max(1, part // 4 + 1), max(1, part // 2))
        start = p * part + rng.randint(1, max(1, part - length - 1))
        spans.append((start, min(start + length, (p + 1) * part - 1)))
    return _VideoPlan(
        num_frames=num_frames,
        colour=rng.choice(sorted(COLOURS)),
        shape=rng.choice(SHAPES),
        x=x,
        y=y,
        side=side,
        spans=tuple(spans),
    )


def _shape_mask(shape: str, side: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5  # [side, side]
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "disc":
        c = side / 2
        return (xx - c) ** 2 + (yy - c) ** 2 <= c * c
    # triangle, apex at the top
    return np.abs(xx - side / 2) <= yy / 2


def render_frame(plan: _VideoPlan, index: int, size: int) -> np.ndarray:
    """Frame ``index`` of a planned video as RGB uint8 ``[size, size, 3]``."""
    frame = np.empty((size, size, 3), dtype=np.uint8)  # [H, W, 3]
    frame[...] = BACKGROUND
    if any(a <= index < b for a, b in plan.spans):
        mask = _shape_mask(plan.shape, plan.side)
        region = frame[plan.y : plan.y + plan.side, plan.x : plan.x + plan.side]
        region[mask] = COLOURS[plan.colour]
    return frame


def write_video(path: str, frames, *, fps: int, codec: str = "h264") -> None:
    """Encode an iterable of RGB uint8 ``[H, W, 3]`` frames to ``path`` with PyAV.

    One frame is held at a time, so a long video costs no more memory than a short one.
    """
    import av

    encoder, _, pix_fmt = CODECS[codec]
    options = {
        "h264": {"preset": "ultrafast", "crf": "18"},
        "vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"},
        "mjpeg": {"q:v": "3"},
    }[codec]
    with av.open(path, mode="w") as container:
        stream = container.add_stream(encoder, rate=Fraction(fps), options=options)
        stream.pix_fmt = pix_fmt
        first = True
        for rgb in frames:
            if first:
                stream.height, stream.width = rgb.shape[:2]
                first = False
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_image(path: str, rgb) -> None:
    """Write one RGB uint8 ``[H, W, 3]`` image with PyAV: PNG for ``.png`` (lossless), JPEG for ``.jpg``."""
    import av

    codec, pix_fmt = ("mjpeg", "yuvj444p") if path.lower().endswith((".jpg", ".jpeg")) else ("png", "rgb24")
    with av.open(path, mode="w", format="image2") as container:
        stream = container.add_stream(codec, rate=1)
        stream.height, stream.width = rgb.shape[:2]
        stream.pix_fmt = pix_fmt
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)


def write_synthetic_image(path: str, *, size: int = 32, seed: int = 0) -> dict:
    """Write one synthetic image (a frame in which the shape shows); returns its plan as a dict."""
    cfg = SyntheticDatasetConfig(num_videos=1, min_frames=8, max_frames=8, size=size, seed=seed)
    plan = _plan_video(random.Random(seed), cfg)
    write_image(path, render_frame(plan, plan.spans[0][0], size))
    return dataclasses.asdict(plan)


def write_synthetic_video(path: str, *, num_frames: int, fps: int = 8, size: int = 32,
                          codec: str = "h264", seed: int = 0) -> dict:
    """Write one synthetic video of exactly ``num_frames`` frames; returns its plan as a dict.

    Used by tests and benchmarks that need a video of a given length (e.g. thousands of frames).
    """
    cfg = SyntheticDatasetConfig(num_videos=1, min_frames=num_frames, max_frames=num_frames, fps=fps,
                                 size=size, codec=codec, seed=seed)
    plan = _plan_video(random.Random(seed), cfg)
    write_video(path, (render_frame(plan, i, size) for i in range(num_frames)), fps=fps, codec=codec)
    return dataclasses.asdict(plan)


def _options_text(letters_and_texts) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in letters_and_texts)


def _records_for(vid: str, rel_path: str, plan: _VideoPlan, cfg: SyntheticDatasetConfig) -> list[dict]:
    t0, t1 = plan.spans[0][0] / cfg.fps, plan.spans[0][1] / cfg.fps
    seen = f"A {plan.colour} {plan.shape} appears on the grey background from {t0:.1f}s to {t1:.1f}s."
    records = []
    if "colour" in cfg.tasks:
        names = sorted(COLOURS)
        letters = "ABCD"
        letter = letters[names.index(plan.colour)]
        records.append({
            "problem_id": f"{vid}-colour",
            "data_type": "video",
            "videos": rel_path,
            "problem": "What colour is the shape that appears in the video?\n"
                       + _options_text(zip(letters, names)),
            "problem_type": "multiple choice",
            "reasoning": f"{seen} Its colour is {plan.colour}, which is option {letter}.",
            "answer": letter,
        })
    if "shape" in cfg.tasks:
        letter = "ABC"[SHAPES.index(plan.shape)]
        records.append({
            "problem_id": f"{vid}-shape",
            "data_type": "video",
            "videos": [rel_path],
            "problem": "Which shape appears in the video?",
            "options": [f"{lt}. {s}" for lt, s in zip("ABC", SHAPES)],
            "problem_type": "multiple choice",
            "reasoning": f"{seen} It is a {plan.shape}, which is option {letter}.",
            "answer": letter,
        })
    if "count" in cfg.tasks:
        n = len(plan.spans)
        records.append({
            "problem_id": f"{vid}-count",
            "data_type": "video",
            "videos": rel_path,
            "problem": "How many separate times does the coloured shape appear in the video?",
            "problem_type": "numerical",
            "reasoning": (f"The {plan.colour} {plan.shape} is shown once and never comes back, so it appears 1 time."
                          if n == 1 else
                          f"The {plan.colour} {plan.shape} is shown, disappears and is shown again; "
                          f"counting the appearances gives {n}."),
            "answer": str(n),
        })
    return records


def _mixed_records(vid: str, index: int, plans: list, paths: list, image: str | None, cfg: SyntheticDatasetConfig,
                   rng: random.Random, audio: tuple[str, str] | None = None) -> list[dict]:
    """The ``image``, ``two_videos``, ``text`` and ``audio`` records of video ``index`` (see ``tasks``);
    ``audio``: the video's tone file and its pitch (a key of ``PITCHES``)."""
    names, letters, records = sorted(COLOURS), "ABCD", []
    plan = plans[index]
    if "image" in cfg.tasks:
        letter = letters[names.index(plan.colour)]
        records.append({
            "problem_id": f"{vid}-image", "data_type": "image", "images": image,
            "problem": "What colour is the shape in the image?\n" + _options_text(zip(letters, names)),
            "reasoning": f"A {plan.colour} {plan.shape} is on the grey background: option {letter}.", "answer": letter,
        })
    if "two_videos" in cfg.tasks and len(plans) > 1:
        other = (index + 1) % len(plans)
        second = plans[other]
        letter = letters[names.index(second.colour)]
        records.append({
            "problem_id": f"{vid}-two-videos", "data_type": "video", "videos": [paths[index], paths[other]],
            "problem": "What colour is the shape in the second video?\n" + _options_text(zip(letters, names)),
            "reasoning": f"The first video shows a {plan.colour} {plan.shape}, the second a {second.colour} "
                         f"{second.shape}: option {letter}.", "answer": letter,
        })
    if "text" in cfg.tasks:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        records.append({
            "problem_id": f"{vid}-text", "data_type": "text", "problem": f"What is {a} + {b}?",
            "problem_type": "numerical", "reasoning": f"{a} plus {b} is {a + b}.", "answer": str(a + b),
        })
    if "audio" in cfg.tasks and audio is not None:
        path, pitch = audio
        letter = {"low": "A", "high": "B"}[pitch]
        records.append({
            "problem_id": f"{vid}-audio", "data_type": "audio", "audios": path,
            "problem": "Is the tone high or low?\nA. low\nB. high", "problem_type": "multiple choice",
            "reasoning": f"A steady {PITCHES[pitch]:.0f} Hz tone plays: a {pitch} pitch, option {letter}.",
            "answer": letter,
        })
    return records


def make_synthetic_dataset(out_dir: str, config: SyntheticDatasetConfig | None = None) -> SyntheticDataset:
    """Write ``config.num_videos`` videos under ``out_dir/videos`` plus ``qa.jsonl`` and ``captions.jsonl``."""
    cfg = config or SyntheticDatasetConfig()
    video_dir = os.path.join(out_dir, "videos")
    os.makedirs(video_dir, exist_ok=True)
    ext = CODECS[cfg.codec][1]
    qa, captions, paths, plans, rel_paths, images, tones = [], [], [], [], [], [], []
    for i in range(cfg.num_videos):
        rng = random.Random(cfg.seed * 1_000_003 + i)
        plan = _plan_video(rng, cfg)
        plans.append(plan)
        vid = f"synth{i:05d}"
        rel_path = f"{vid}.{ext}"
        rel_paths.append(rel_path)
        path = os.path.join(video_dir, rel_path)
        frames = (render_frame(plan, k, cfg.size) for k in range(plan.num_frames))
        write_video(path, frames, fps=cfg.fps, codec=cfg.codec)
        paths.append(path)
        images.append(None)
        tones.append(None)
        if "image" in cfg.tasks:  # a still of the video while the shape shows
            images[-1] = f"{vid}.png"
            write_image(os.path.join(video_dir, images[-1]), render_frame(plan, plan.spans[0][0], cfg.size))
        if "audio" in cfg.tasks:  # its own generator: the videos' plans stay those of a dataset without audio
            tone_rng = random.Random(cfg.seed * 1_000_003 + i + 13)
            pitch, seconds = tone_rng.choice(sorted(PITCHES)), tone_rng.choice((1.5, 2.0, 2.5))
            tones[-1] = (f"{vid}.wav", pitch)
            make_tone_audio(os.path.join(video_dir, tones[-1][0]), frequency_hz=PITCHES[pitch], seconds=seconds)
        qa.extend(_records_for(vid, rel_path, plan, cfg))
        times = ", ".join(f"{a / cfg.fps:.1f}s to {b / cfg.fps:.1f}s" for a, b in plan.spans)
        captions.append({
            "id": f"{vid}-caption",
            "data_type": "video",
            "videos": rel_path,
            "caption": f"A {plan.colour} {plan.shape} on a grey background, shown from {times}.",
        })
    for i in range(cfg.num_videos):
        qa.extend(_mixed_records(f"synth{i:05d}", i, plans, rel_paths, images[i], cfg,
                                 random.Random(cfg.seed * 1_000_003 + i + 7), audio=tones[i]))
    qa_path = os.path.join(out_dir, "qa.jsonl")
    caption_path = os.path.join(out_dir, "captions.jsonl")
    for p, rows in ((qa_path, qa), (caption_path, captions)):
        with open(p, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return SyntheticDataset(video_root=video_dir, qa_path=qa_path, caption_path=caption_path,
                            video_paths=tuple(paths))
