"""Synthetic audio for tests and the CPU demo: tones written as real encoded files, alone or as the
audio track of a small video.

A tone is a sum of nothing but one sine per channel, so a test knows the exact frequency content of
what it decodes. Files are encoded with PyAV (WAV PCM, FLAC, AAC in .m4a, MP3, Opus in .ogg; AAC or
MP3 beside H.264 in .mp4), so every test goes through real demuxing, decoding and resampling.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

AUDIO_CODECS: dict[str, tuple[str, str]] = {
    # name: (PyAV encoder, container extension)
    "pcm_s16le": ("pcm_s16le", "wav"),
    "flac": ("flac", "flac"),
    "aac": ("aac", "m4a"),
    "mp3": ("libmp3lame", "mp3"),
    "opus": ("libopus", "ogg"),  # libopus takes 8, 12, 16, 24 or 48 kHz only
}
_LAYOUTS = {1: "mono", 2: "stereo"}
_CHUNK = 1024  # samples per frame handed to the encoder (PyAV re-frames to the codec's frame size)


def tone(frequency_hz, *, seconds: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    """``[num_channels, n]`` float32: one sine of ``amplitude`` per channel, at ``frequency_hz`` (a
    number for mono, a tuple of one frequency per channel, e.g. ``(440, 1000)`` for stereo)."""
    freqs = (frequency_hz,) if np.isscalar(frequency_hz) else tuple(frequency_hz)
    t = np.arange(int(round(seconds * sample_rate)), dtype=np.float64) / sample_rate  # [n]
    return np.stack([amplitude * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32)


def _add_audio_stream(container, codec: str, sample_rate: int, num_channels: int):
    if codec not in AUDIO_CODECS:
        raise ValueError(f"codec must be one of {sorted(AUDIO_CODECS)}, got {codec!r}")
    if num_channels not in _LAYOUTS:
        raise ValueError(f"1 or 2 channels supported, got {num_channels}")
    return container.add_stream(AUDIO_CODECS[codec][0], rate=sample_rate, layout=_LAYOUTS[num_channels])


def _audio_frames(samples: np.ndarray, sample_rate: int):
    import av

    layout = _LAYOUTS[samples.shape[0]]
    for start in range(0, samples.shape[1], _CHUNK):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start : start + _CHUNK]),
                                           format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
        yield frame


def write_audio(path: str, samples: np.ndarray, *, sample_rate: int, codec: str = "pcm_s16le") -> None:
    """Encode ``[num_channels, n]`` float samples in [-1, 1] to ``path`` (its extension picks the
    container; ``AUDIO_CODECS`` gives the usual one per codec)."""
    import av

    with av.open(path, mode="w") as container:
        stream = _add_audio_stream(container, codec, sample_rate, samples.shape[0])
        for frame in _audio_frames(samples, sample_rate):
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_tone_audio(path: str, *, frequency_hz=440.0, seconds: float = 2.0, sample_rate: int = 16000,
                    codec: str = "pcm_s16le", amplitude: float = 0.5) -> np.ndarray:
    """Write a tone (see ``tone``) to ``path`` with ``codec``; returns the ``[num_channels, n]``
    samples before encoding."""
    samples = tone(frequency_hz, seconds=seconds, sample_rate=sample_rate, amplitude=amplitude)
    write_audio(path, samples, sample_rate=sample_rate, codec=codec)
    return samples


def make_video_with_audio(path: str, *, num_frames: int = 16, fps: int = 8, size: int = 32,
                          frequency_hz=440.0, sample_rate: int = 16000, audio_codec: str = "aac",
                          amplitude: float = 0.5) -> np.ndarray:
    """Write an H.264 .mp4 of ``num_frames`` grey frames (a white bar steps across them) with a tone
    track (``aac`` or ``mp3``) as long as the video; returns the tone's ``[num_channels, n]`` samples."""
    import av

    if audio_codec not in ("aac", "mp3"):
        raise ValueError(f"audio_codec must be 'aac' or 'mp3' in an .mp4, got {audio_codec!r}")
    samples = tone(frequency_hz, seconds=num_frames / fps, sample_rate=sample_rate, amplitude=amplitude)
    with av.open(path, mode="w") as container:
        video = container.add_stream("libx264", rate=Fraction(fps), options={"preset": "ultrafast"})
        video.pix_fmt, video.width, video.height = "yuv420p", size, size
        audio = _add_audio_stream(container, audio_codec, sample_rate, samples.shape[0])
        audio_frames = list(_audio_frames(samples, sample_rate))
        for i in range(num_frames):  # interleave: each video frame, then the audio up to its end time
            rgb = np.full((size, size, 3), 128, dtype=np.uint8)  # [H, W, 3]
            rgb[:, (i * 2) % size : (i * 2) % size + 2] = 255
            for packet in video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
            for frame in audio_frames[i * len(audio_frames) // num_frames : (i + 1) * len(audio_frames) // num_frames]:
                for packet in audio.encode(frame):
                    container.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode():
                container.mux(packet)
    return samples
