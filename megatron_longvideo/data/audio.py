"""Decode an audio track into a 16 kHz mono waveform, and turn it into Whisper-style log-mel windows.

``decode_audio(path, config)`` reads the first audio stream of a video or audio file with PyAV
(wav, flac, mp3, aac in mp4 / m4a, opus in ogg / webm, ...), resamples it to ``config.sampling_rate``
with ``av.AudioResampler`` and mixes it to mono by averaging the channels (what ``librosa.load``
does, which is how Qwen2-Audio's examples load audio; FFmpeg's own stereo downmix instead scales each
channel by 1/sqrt(2) and can leave [-1, 1]). Samples are float32, clamped to [-1, 1].

``log_mel_features(waveform, config)`` computes, in torch, the log-mel spectrogram that
``transformers.WhisperFeatureExtractor`` computes (the feature extractor of Qwen2-Audio, with 128 mel
bins) and splits it into encoder windows of ``window_seconds``:
- the waveform is cut into windows of ``window_seconds * sampling_rate`` samples and the last one
  padded with zeros (silence) to full length, as the extractor pads with ``padding="max_length"``;
- each window: centred STFT (reflect padding, periodic Hann window of ``n_fft``), the last frame
  dropped, power spectrum, Slaney-normalised mel filters on the Slaney mel scale from 0 Hz to
  ``max_frequency_hz``, ``log10(max(x, 1e-10))``, floored at (the window's maximum - 8), where the
  maximum is taken over the whole padded window, then ``(x + 4) / 4``;
- the valid length of a window, in mel frames, is ``ceil(valid_samples / hop_length)``: the sum of
  the ``attention_mask`` the extractor returns with ``return_attention_mask=True``, which is what
  Qwen2-Audio's processor passes on as ``feature_attention_mask``.
Each window so equals the extractor's output on that stretch of waveform (tested to 1e-5 in
``tests/data/test_audio.py``). Qwen2-Audio itself reads one window per audio (its processor cuts at
30 s); longer audio gives several windows here, for the caller to encode one by one.

Errors raise ``AudioDecodeError``, a ``VideoDecodeError``, so the skip machinery of ``data.errors``
counts a bad audio track under its own ``audio: ...`` reason.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch

from megatron_longvideo.data.errors import VideoDecodeError


@dataclasses.dataclass(frozen=True, kw_only=True)
class AudioSamplingConfig:
    """How audio is decoded and featurised; the defaults are Qwen2-Audio's (Whisper-large-v3 features)."""

    sampling_rate: int = 16000
    """Rate the waveform is resampled to, in Hz; the mel features assume it."""

    n_mels: int = 128
    """Mel bins per frame (128 for Qwen2-Audio and Whisper-large-v3, 80 for older Whisper)."""

    n_fft: int = 400
    """STFT size and Hann window length, in samples (25 ms at 16 kHz)."""

    hop_length: int = 160
    """STFT hop in samples (10 ms at 16 kHz): one mel frame per hop."""

    window_seconds: int = 30
    """Length of one encoder window; 30 s at the defaults is 3000 mel frames."""

    max_frequency_hz: float = 8000.0
    """Top of the mel filter bank. WhisperFeatureExtractor fixes it at 8000 Hz whatever the rate."""

    max_seconds: float | None = 600.0
    """Cap on the audio used from one file. Longer audio is cut: the first ``max_seconds`` are kept,
    decoding stops there (a three-hour file costs no more than the cap) and ``DecodedAudio.truncated``
    is set. ``None``: no cap."""

    strict_duration: bool = True
    """Report a file as truncated when its stream ends well before the duration its header declares
    (more than 2% and 0.1 s short). ``False`` keeps the samples that are there."""

    def __post_init__(self):
        for name in ("sampling_rate", "n_mels", "n_fft", "hop_length", "window_seconds"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hop_length > self.n_fft:
            raise ValueError(f"hop_length must be <= n_fft ({self.n_fft}), got {self.hop_length}")
        if self.window_samples % self.hop_length:
            raise ValueError(f"window_seconds * sampling_rate ({self.window_samples}) must be a multiple of "
                             f"hop_length, got hop_length={self.hop_length}")
        if not 0 < self.max_frequency_hz <= self.sampling_rate / 2:
            raise ValueError(f"max_frequency_hz must be in (0, sampling_rate / 2 = {self.sampling_rate / 2}], "
                             f"got {self.max_frequency_hz}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0 or None, got {self.max_seconds}")

    @property
    def window_samples(self) -> int:
        """Samples in one encoder window (480000 at the defaults)."""
        return self.window_seconds * self.sampling_rate

    @property
    def window_frames(self) -> int:
        """Mel frames in one encoder window (3000 at the defaults)."""
        return self.window_samples // self.hop_length


@dataclasses.dataclass(frozen=True)
class DecodedAudio:
    """A mono waveform at the config's rate, and where it came from."""

    path: str
    waveform: torch.Tensor
    """[n] float32 in [-1, 1] at ``sampling_rate``."""
    sampling_rate: int
    source_sample_rate: int
    """Rate of the file's audio stream, in Hz."""
    source_channels: int
    truncated: bool
    """The file holds more than ``max_seconds`` of audio; ``waveform`` is its start."""

    @property
    def duration(self) -> float:
        """Seconds of audio in ``waveform``."""
        return self.waveform.shape[0] / self.sampling_rate


class AudioDecodeError(VideoDecodeError):
    """An audio track cannot be used: file missing, not media, no audio stream, truncated, empty.

    The message reads ``<path>: cannot decode audio: <reason>``; ``data.errors.video_skip_reason``
    counts it as ``audio: <short reason>``.
    """

    def __init__(self, path: str, reason: str | None = None, *, context: str | None = None):
        super().__init__(path, reason, context=context)
        if reason is not None:
            suffix = f" ({context})" if context else ""
            ValueError.__init__(self, f"{self.path}: cannot decode audio: {reason}{suffix}")

    def __reduce__(self):
        return (_rebuild_audio_error, (self.path, self.reason, self.context))


def _rebuild_audio_error(path, reason, context):
    return AudioDecodeError(path, reason, context=context)


def _declared_seconds(container, stream) -> float | None:
    """The audio stream's duration from the header; the container's where the stream has none and is
    the only stream (a video's container duration may belong to its video)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and len(container.streams) == 1:
        return (container.duration - max(container.start_time or 0, 0)) / 1_000_000
    return None


def decode_audio(path: str, config: AudioSamplingConfig) -> DecodedAudio:
    """Decode the first audio stream of ``path`` to mono float32 at ``config.sampling_rate`` (see the
    module docstring), or raise ``AudioDecodeError`` with one message naming the file.

    Samples are concatenated in decoding order; timestamps (a stream starting late, gaps) are not
    turned into silence.
    """
    import av

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioDecodeError(path, "file not found, expected an audio or video file")
    if os.path.isdir(path):
        raise AudioDecodeError(path, "is a directory, expected an audio or video file")
    if os.path.getsize(path) == 0:
        raise AudioDecodeError(path, "file is empty (0 bytes)")
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise AudioDecodeError(
            path, f"not a readable media container (truncated, corrupt or not an audio/video file: {e.strerror})"
        ) from None
    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise AudioDecodeError(path, f"no audio stream (streams found: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        if stream.codec_context is None:
            raise AudioDecodeError(path, "unsupported codec: FFmpeg has no decoder for its audio stream")
        source_rate, source_channels = stream.rate, stream.channels
        max_samples = None if config.max_seconds is None else int(config.max_seconds * config.sampling_rate)
        # planar float at the target rate, channels kept: they are averaged below, not by FFmpeg
        resampler = av.AudioResampler(format="fltp", rate=config.sampling_rate)
        chunks, num_samples, truncated = [], 0, False
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(torch.from_numpy(out.to_ndarray()).mean(dim=0))  # [n_chunk]
                    num_samples += chunks[-1].shape[0]
                if max_samples is not None and num_samples > max_samples:
                    truncated = True
                    break
            else:
                for out in resampler.resample(None):
                    chunks.append(torch.from_numpy(out.to_ndarray()).mean(dim=0))  # [n_chunk]
                    num_samples += chunks[-1].shape[0]
        except av.error.FFmpegError as e:
            raise AudioDecodeError(
                path, f"truncated or corrupt: decoding failed after {num_samples / config.sampling_rate:.2f} s "
                      f"of audio ({e.strerror})") from None
        if num_samples == 0:
            raise AudioDecodeError(path, "audio stream has no samples (empty audio)")
        declared = _declared_seconds(container, stream)
        got = num_samples / config.sampling_rate
        if config.strict_duration and not truncated and declared and got < declared - max(0.1, 0.02 * declared):
            raise AudioDecodeError(
                path, f"truncated or corrupt: the header declares {declared:.2f} s of audio but the stream "
                      f"holds {got:.2f} s")
    waveform = torch.cat(chunks)  # [n]
    if max_samples is not None and num_samples > max_samples:  # the resampler's flush may also pass the cap
        waveform, truncated = waveform[:max_samples], True
    return DecodedAudio(path=path, waveform=waveform.clamp_(-1.0, 1.0), sampling_rate=config.sampling_rate,
                        source_sample_rate=int(source_rate), source_channels=int(source_channels),
                        truncated=truncated)


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above."""
    log_step = 27.0 / math.log(6.4)
    return torch.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + torch.log(hz / 1000.0) * log_step)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    log_step = math.log(6.4) / 27.0
    return torch.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * torch.exp(log_step * (mel - 15.0)))


@functools.lru_cache(maxsize=8)
def mel_filters(n_fft: int, n_mels: int, sampling_rate: int, max_frequency_hz: float) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] float32: triangular filters evenly spaced on the Slaney mel scale
    from 0 Hz to ``max_frequency_hz``, each scaled by 2 / (its bandwidth in Hz) (Slaney's constant
    energy normalisation). Built in float64 and rounded once, as the HF extractor does."""
    edges_mel = torch.linspace(0.0, float(_hz_to_mel(torch.tensor(max_frequency_hz, dtype=torch.float64))),
                               n_mels + 2, dtype=torch.float64)
    edges = _mel_to_hz(edges_mel)  # [n_mels + 2] lower edge, centre, upper edge of each filter
    bins = torch.linspace(0.0, sampling_rate // 2, n_fft // 2 + 1, dtype=torch.float64)  # [n_bins]
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [n_mels, 1] each
    rising = (bins[None, :] - lower) / (centre - lower)  # [n_mels, n_bins]
    falling = (upper - bins[None, :]) / (upper - centre)
    triangles = torch.minimum(rising, falling).clamp_min_(0.0)
    return (triangles * (2.0 / (upper - lower))).to(torch.float32)


def log_mel_features(waveform: torch.Tensor, config: AudioSamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n]`` waveform at ``config.sampling_rate`` -> ``(features [num_windows, n_mels, window_frames]
    float32, lengths [num_windows] int64)``; see the module docstring for the math.

    ``num_windows = ceil(n / window_samples)``. ``lengths[i]`` is window i's valid mel frames (all
    but the last are full); a last window holding only a few samples gets a length of a few frames,
    which Qwen2-Audio's encoder turns into as few as zero tokens (see ``audio_token_counts``).
    Computed on the waveform's device, one window at a time (memory stays that of one window).
    """
    if waveform.dim() != 1 or waveform.shape[0] == 0:
        raise ValueError(f"waveform must be a non-empty 1-D tensor, got shape {tuple(waveform.shape)}")
    n, window = waveform.shape[0], config.window_samples
    num_windows = -(-n // window)
    filters = mel_filters(config.n_fft, config.n_mels, config.sampling_rate,
                          config.max_frequency_hz).to(waveform.device)  # [n_mels, n_bins]
    hann = torch.hann_window(config.n_fft, device=waveform.device)  # periodic, as torch.stft expects
    features = torch.empty(num_windows, config.n_mels, config.window_frames, device=waveform.device)
    for i in range(num_windows):
        chunk = waveform[i * window : (i + 1) * window].float()  # [<= window]
        if chunk.shape[0] < window:
            chunk = torch.nn.functional.pad(chunk, (0, window - chunk.shape[0]))  # [window], zeros = silence
        spec = torch.stft(chunk, config.n_fft, config.hop_length, window=hann, center=True, pad_mode="reflect",
                          return_complex=True)  # [n_bins, window_frames + 1]
        power = (spec[:, :-1].abs() ** 2).contiguous()  # [n_bins, window_frames]
        log_mel = torch.clamp(filters @ power, min=1e-10).log10()  # [n_mels, window_frames]
        log_mel = torch.maximum(log_mel, log_mel.max() - 8.0)
        features[i] = (log_mel + 4.0) / 4.0
    valid = torch.full((num_windows,), window, dtype=torch.int64)
    valid[-1] = n - (num_windows - 1) * window
    lengths = (valid + config.hop_length - 1) // config.hop_length  # [num_windows]
    return features, lengths


def audio_token_counts(lengths):
    """Tokens Qwen2-Audio's encoder gives a window of ``lengths`` valid mel frames (an int, or a tensor of
    them): its stride-2 conv, then its stride-2 average pool (750 for a full 3000-frame window; 0 for 0)."""
    after_conv = (lengths - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def pack_windows(features: torch.Tensor, lengths) -> torch.Tensor:
    """``features [num_windows, num_mel_bins, window_frames]`` and the real frames of each window
    (``lengths``, ints or a tensor ``[num_windows]``) -> the tower's input ``[num_windows, num_mel_bins + 1,
    window_frames]`` (the mask as the last row)."""
    if features.dim() != 3:
        raise ValueError(f"features: expected [num_windows, num_mel_bins, window_frames], got shape {tuple(features.shape)}")
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=features.device).reshape(-1)
    if lengths.numel() != features.shape[0]:
        raise ValueError(f"lengths: got {lengths.numel()} for {features.shape[0]} windows")
    mask = torch.arange(features.shape[-1], device=features.device)[None, :] < lengths[:, None]  # [w, F]
    return torch.cat([features, mask[:, None, :].to(features.dtype)], dim=1)


def unpack_windows(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_windows`: ``(features [w, num_mel_bins, F], lengths [w])``."""
    return windows[:, :-1], windows[:, -1].sum(-1).round().long()
