"""Audio decoding and Whisper log-mel features, on real encoded files made by ``synthetic_audio``."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from megatron_longvideo.data.audio import (AudioSamplingConfig, AudioDecodeError, audio_token_counts, decode_audio,
                                           log_mel_features, mel_filters)
from megatron_longvideo.data.errors import SkipReport, VideoDecodeError, video_skip_reason
from megatron_longvideo.data.synthetic import write_synthetic_video
from megatron_longvideo.data.synthetic_audio import AUDIO_CODECS, make_tone_audio, make_video_with_audio

CFG = AudioSamplingConfig()
CHECKED_WITH_TRANSFORMERS = "5.24.0"
"""The transformers version whose WhisperFeatureExtractor our features were checked against."""


def _spectrum(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """Amplitude of each 1 Hz bin over the first second (a sine of amplitude a reads a)."""
    return np.abs(np.fft.rfft(x[:sample_rate])) / (sample_rate / 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    return str(root)


def test_decode_wav_mono_16k_is_lossless(files):
    path = os.path.join(files, "mono16k.wav")
    written = make_tone_audio(path, frequency_hz=440.0, seconds=2.0, sample_rate=16000)
    out = decode_audio(path, CFG)
    assert out.waveform.dtype == torch.float32 and out.waveform.shape == (32000,)
    assert (out.source_sample_rate, out.source_channels, out.duration, out.truncated) == (16000, 1, 2.0, False)
    assert np.abs(out.waveform.numpy() - written[0]).max() <= 1 / 32768  # 16-bit quantisation only


@pytest.mark.parametrize("sample_rate,codec", [(44100, "pcm_s16le"), (48000, "pcm_s16le"), (48000, "flac")])
def test_stereo_is_resampled_to_16k_and_averaged_to_mono(files, sample_rate, codec):
    from scipy.signal import resample_poly

    path = os.path.join(files, f"stereo{sample_rate}.{AUDIO_CODECS[codec][1]}")
    written = make_tone_audio(path, frequency_hz=(440.0, 1000.0), seconds=2.0, sample_rate=sample_rate, codec=codec)
    out = decode_audio(path, CFG)
    x = out.waveform.numpy()  # [n]
    assert x.shape == (32000,) and (out.source_sample_rate, out.source_channels) == (sample_rate, 2)
    mid = slice(800, -800)  # the resampling filters differ within their length of the ends
    reference = resample_poly(written.mean(axis=0).astype(np.float64), 16000, sample_rate)  # [n]
    assert np.abs(x - reference)[mid].max() < 2e-3
    t = np.arange(x.shape[0]) / 16000
    exact = 0.25 * np.sin(2 * np.pi * 440 * t) + 0.25 * np.sin(2 * np.pi * 1000 * t)  # (L + R) / 2
    assert np.abs(x - exact)[mid].max() < 1e-4
    spectrum = _spectrum(x, 16000)
    assert np.allclose(spectrum[[440, 1000]], 0.25, atol=1e-3)
    assert np.delete(spectrum, [440, 1000]).max() < 1e-3


@pytest.mark.parametrize("codec,sample_rate", [("aac", 48000), ("mp3", 44100), ("opus", 48000)])
def test_lossy_codecs_keep_the_tone(files, codec, sample_rate):
    path = os.path.join(files, f"tone.{AUDIO_CODECS[codec][1]}")
    make_tone_audio(path, frequency_hz=(440.0, 440.0), seconds=2.0, sample_rate=sample_rate, codec=codec)
    out = decode_audio(path, CFG)
    assert abs(out.duration - 2.0) < 0.05 and out.waveform.abs().max() <= 1.0
    spectrum = _spectrum(out.waveform.numpy(), 16000)
    assert int(spectrum.argmax()) == 440 and abs(spectrum[440] - 0.5) < 0.05


def test_decode_audio_track_of_a_video(files):
    from megatron_longvideo.data.sampling import FrameSamplingConfig
    from megatron_longvideo.data.video import decode_video

    path = os.path.join(files, "with_audio.mp4")
    make_video_with_audio(path, num_frames=24, fps=8, frequency_hz=(440.0, 880.0), sample_rate=44100)
    out = decode_audio(path, CFG)
    assert (out.source_sample_rate, out.source_channels) == (44100, 2) and abs(out.duration - 3.0) < 0.05
    spectrum = _spectrum(out.waveform.numpy()[8000:], 16000)  # past AAC's priming samples
    assert np.allclose(spectrum[[440, 880]], 0.25, atol=0.02)
    assert decode_video(path, FrameSamplingConfig(num_frames=4, image_size=16)).frames.shape == (4, 3, 16, 16)


def test_max_seconds_keeps_the_start(files):
    path = os.path.join(files, "five_seconds.wav")
    written = make_tone_audio(path, frequency_hz=300.0, seconds=5.0, sample_rate=16000)
    out = decode_audio(path, AudioSamplingConfig(max_seconds=2.0))
    assert out.truncated and out.waveform.shape == (32000,)
    assert np.abs(out.waveform.numpy() - written[0, :32000]).max() <= 1 / 32768
    full = decode_audio(path, AudioSamplingConfig(max_seconds=None))
    assert not full.truncated and full.waveform.shape == (80000,)
    assert not decode_audio(path, AudioSamplingConfig(max_seconds=5.0)).truncated


def _test_waveform(seconds: float, seed: int = 0) -> torch.Tensor:
    """A tone in noise with one second of digital silence: exercises the 1e-10 clamp and the -8 floor."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * 16000)
    t = torch.arange(n, dtype=torch.float64) / 16000
    x = (0.3 * torch.sin(2 * torch.pi * 440 * t)).float() + 0.05 * torch.randn(n, generator=g)  # [n]
    x[16000:32000] = 0.0
    return x.clamp_(-1, 1)


@pytest.mark.parametrize("n_mels,seconds", [(128, 70.3), (80, 12.34567)])
def test_features_equal_whisper_feature_extractor(n_mels, seconds):
    """Window i equals WhisperFeatureExtractor(feature_size=n_mels) on samples [30 i s, 30 (i + 1) s),
    called as Qwen2-Audio's processor calls it (``padding="max_length"``, ``return_attention_mask=True``,
    the mask's sum being its ``feature_attention_mask`` length). Checked with transformers 5.24.0."""
    transformers = pytest.importorskip("transformers")
    from transformers import WhisperFeatureExtractor

    config = AudioSamplingConfig(n_mels=n_mels)
    extractor = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000, hop_length=160, chunk_length=30,
                                        n_fft=400)
    assert np.array_equal(mel_filters(400, n_mels, 16000, 8000.0).numpy(),
                          extractor.mel_filters.T.astype(np.float32))
    waveform = _test_waveform(seconds)
    features, lengths = log_mel_features(waveform, config)
    num_windows = -(-waveform.shape[0] // 480000)
    assert features.shape == (num_windows, n_mels, 3000) and lengths.shape == (num_windows,)
    for i in range(num_windows):
        chunk = waveform[i * 480000 : (i + 1) * 480000].numpy()
        ref = extractor(chunk, sampling_rate=16000, return_attention_mask=True, padding="max_length",
                        return_tensors="pt")
        diff = (ref["input_features"][0] - features[i]).abs().max().item()
        assert diff <= 1e-5, f"window {i}: max diff {diff} (transformers {transformers.__version__}, checked with "\
                             f"{CHECKED_WITH_TRANSFORMERS})"
        assert int(ref["attention_mask"].sum()) == int(lengths[i])


def test_windows_and_lengths():
    features, lengths = log_mel_features(torch.zeros(70 * 16000), CFG)
    assert features.shape == (3, 128, 3000) and lengths.tolist() == [3000, 3000, 1000]
    assert log_mel_features(torch.zeros(60 * 16000), CFG)[1].tolist() == [3000, 3000]
    assert log_mel_features(torch.zeros(30 * 16000 + 1), CFG)[1].tolist() == [3000, 1]  # ceil(samples / hop)
    assert log_mel_features(torch.zeros(12345), CFG)[1].tolist() == [78]
    assert audio_token_counts(torch.tensor([3000, 1000, 78, 1])).tolist() == [750, 250, 19, 0]
    with pytest.raises(ValueError, match="non-empty 1-D"):
        log_mel_features(torch.zeros(0), CFG)


def test_features_of_a_decoded_file(files):
    """decode -> features end to end: a 440 Hz tone lights the mel bin holding 440 Hz."""
    path = os.path.join(files, "tone_for_features.flac")
    make_tone_audio(path, frequency_hz=440.0, seconds=4.0, sample_rate=48000, codec="flac")
    features, lengths = log_mel_features(decode_audio(path, CFG).waveform, CFG)
    assert features.shape == (1, 128, 3000) and lengths.tolist() == [400]
    peak_bin = int(features[0, :, 10:390].mean(dim=1).argmax())
    assert int(mel_filters(400, 128, 16000, 8000.0)[:, 11].argmax()) == peak_bin  # FFT bin 11 = 440 Hz


@pytest.mark.parametrize("field,value", [("sampling_rate", 0), ("n_mels", -1), ("hop_length", 401),
                                         ("window_seconds", 2.5), ("max_frequency_hz", 9000.0),
                                         ("max_seconds", 0.0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AudioSamplingConfig(**{field: value})


@pytest.fixture(scope="module")
def bad_audio(files):
    """name -> (path, message fragment, skip reason)."""
    folder = os.path.join(files, "bad")
    os.makedirs(folder)
    bad = {}

    def put(name, content, fragment, reason):
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(content)
        bad[name] = (path, fragment, reason)

    def first_half(name, make):
        full = os.path.join(files, "full_" + name)
        make(full)
        return open(full, "rb").read()[: os.path.getsize(full) // 2]

    bad["missing.wav"] = (os.path.join(folder, "missing.wav"), "file not found", "audio: file not found")
    put("empty.wav", b"", r"file is empty \(0 bytes\)", "audio: empty file")
    put("text.mp3", b"this is a text file, not audio\n" * 20, "not a readable media container",
        "audio: not a readable container")
    silent = os.path.join(folder, "no_audio.mp4")
    write_synthetic_video(silent, num_frames=16, size=32)
    bad["no_audio.mp4"] = (silent, r"no audio stream \(streams found: video\)", "audio: no audio stream")
    # FLAC cut in half: the decoder fails mid-stream
    put("truncated.flac", first_half("t.flac", lambda p: make_tone_audio(p, seconds=3.0, sample_rate=48000,
                                                                        codec="flac")),
        r"truncated or corrupt: decoding failed after \d", "audio: truncated or corrupt")
    # MP3 cut in half: decodes cleanly, but its header declares twice the audio
    put("truncated.mp3", first_half("t.mp3", lambda p: make_tone_audio(p, seconds=3.0, sample_rate=44100,
                                                                      codec="mp3")),
        r"truncated or corrupt: the header declares 3.00 s of audio but the stream holds 1.\d\d s",
        "audio: truncated or corrupt")
    # MP4 cut in half: its index (moov) is at the end, so nothing opens
    put("truncated.mp4", first_half("t.mp4", lambda p: make_video_with_audio(p, num_frames=24)),
        "not a readable media container", "audio: not a readable container")
    return bad


@pytest.mark.parametrize("name", ["missing.wav", "empty.wav", "text.mp3", "no_audio.mp4", "truncated.flac",
                                  "truncated.mp3", "truncated.mp4"])
def test_each_bad_audio_has_one_clear_message(bad_audio, name):
    path, fragment, reason = bad_audio[name]
    with pytest.raises(AudioDecodeError, match=fragment) as e:
        decode_audio(path, CFG)
    msg = str(e.value)
    assert msg.startswith(path + ": cannot decode audio: ") and msg.count("\n") == 0
    assert isinstance(e.value, VideoDecodeError) and e.value.path == path
    assert video_skip_reason(msg) == reason


def test_bad_audio_is_counted_and_survives_pickling(bad_audio):
    errors = []
    for path, _, _ in bad_audio.values():
        with pytest.raises(AudioDecodeError) as e:
            decode_audio(path, CFG)
        errors.append(e.value)
    report = SkipReport(log=None)
    report.add_video_errors(errors)
    assert report.counts() == {"audio: not a readable container": 2, "audio: truncated or corrupt": 2,
                               "audio: file not found": 1, "audio: empty file": 1, "audio: no audio stream": 1}
    for error in errors:
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is AudioDecodeError and str(again) == str(error) and again.reason == error.reason
        assert str(AudioDecodeError(str(error))) == str(error)  # how DataLoader workers rebuild it


def test_truncated_mp3_decodes_when_not_strict(bad_audio):
    out = decode_audio(bad_audio["truncated.mp3"][0], AudioSamplingConfig(strict_duration=False))
    assert 1.0 < out.duration < 2.0
