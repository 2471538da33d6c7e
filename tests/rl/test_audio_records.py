"""Audio records through the data pipeline and the GRPO trainer, on a tiny Qwen2-Audio-shaped model (issue 18).

Real files written with PyAV: tones in a WAV and a FLAC file, the AAC audio track of an MP4 video, and
a video without an audio stream. The dataset decodes each audio (resampled to 16 kHz mono, log-mel windows
of 1 s here, so a 2.5 s audio is three windows that parallel encoding splits over the ranks), counts its
placeholder tokens with the model's counter, and in skip mode steps over the video without audio,
naming the file once and counting it under ``audio: no audio stream``. Two GRPO steps at CP=2 with
shared-prefix packing on audio and text-only records equal world=1 unpacked.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.dist import init_cpu_dist, run_ranks
from tests.rl.test_grpo_e2e import VOCAB_TEXTS, _assert_same_runs
from tests.rl.test_mixed_modalities import train_two_steps

WINDOW_SECONDS = 1


def _audio_config():
    from megatron_longvideo.data.audio import AudioSamplingConfig

    return AudioSamplingConfig(n_mels=16, window_seconds=WINDOW_SECONDS, max_frequency_hz=8000.0)


def _model_config(tok):
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.qwen2_audio.audio import AudioConfig
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig

    frames = 100 * WINDOW_SECONDS  # mel frames per window (10 ms each)
    return Qwen2AudioConfig(llm=LLMConfig.tiny(vocab_size=304, init_std=0.1),
                            audio=AudioConfig(num_mel_bins=16, max_source_positions=frames // 2, freeze=True,
                                              freeze_projector=True),
                            audio_token_id=tok.video_id)


def _write(root: str) -> str:
    from megatron_longvideo.data.synthetic import write_synthetic_video
    from megatron_longvideo.data.synthetic_audio import make_tone_audio, make_video_with_audio

    media = os.path.join(root, "media")
    os.makedirs(media, exist_ok=True)
    make_tone_audio(os.path.join(media, "low.wav"), frequency_hz=220.0, seconds=2.5, sample_rate=44100)
    make_tone_audio(os.path.join(media, "high.flac"), frequency_hz=1760.0, seconds=1.5, sample_rate=48000, codec="flac")
    make_video_with_audio(os.path.join(media, "talk.mp4"), num_frames=16, fps=8, frequency_hz=880.0)
    write_synthetic_video(os.path.join(media, "silent.mp4"), num_frames=8)  # no audio stream
    question = "what colour is the shape\nA. red\nB. blue"
    records = [
        {"problem_id": "low", "audios": "media/low.wav", "problem": question, "answer": "A"},
        {"problem_id": "text", "data_type": "text", "problem": "answer with the letter of the option\nA. a b\nB. c d",
         "answer": "B"},
        {"problem_id": "silent", "audios": ["media/silent.mp4"], "problem": question, "answer": "A"},
        {"problem_id": "two", "audios": ["media/high.flac", "media/talk.mp4"], "problem": question, "answer": "B"},
    ]
    path = os.path.join(root, "audio.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def _dataset(root, tok, cfg):
    from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
    from megatron_longvideo.models import audio_token_counter

    data = VideoDatasetConfig(mode="rl", video_root=root, audio=_audio_config(), on_error="skip")
    return LongVideoDataset.from_file(os.path.join(root, "audio.jsonl"), tokenizer=tok, num_video_tokens=1,
                                      num_audio_tokens=audio_token_counter(cfg), config=data)


def _worker(rank, world_size, root, tok_path, pack):
    init_cpu_dist()
    from megatron_longvideo.data.sampler import DistributedVideoSampler
    from megatron_longvideo.data.tokenizer import load_tokenizer
    from megatron_longvideo.models import special_tokens
    from megatron_longvideo.models.qwen2_audio.model import build_qwen2_audio
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.prompt_stream import PromptStream

    tok = load_tokenizer(tok_path, special=special_tokens("qwen2_audio"))
    groups = initialize_parallel(ParallelConfig(context_parallel_size=world_size), seed=7)
    cfg = _model_config(tok)
    dataset = _dataset(root, tok, cfg)
    sampler = DistributedVideoSampler(len(dataset), dp_rank=0, dp_size=1, seed=0, shuffle=False, drop_last=False)
    stream = PromptStream(dataset, sampler, group=groups.tp_cp)
    out = train_two_steps(cfg, build_qwen2_audio, tok, groups, stream, pack)
    stream.close()
    destroy_parallel()
    return out


def test_audio_samples_tokens_and_a_bad_audio_counted(tmp_path):
    from megatron_longvideo.data.audio import AudioDecodeError
    from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
    from megatron_longvideo.data.tokenizer import load_tokenizer, train_sentencepiece
    from megatron_longvideo.models import special_tokens

    tok = load_tokenizer(train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300,
                                             special=special_tokens("qwen2_audio")), special=special_tokens("qwen2_audio"))
    root = str(tmp_path)
    _write(root)
    cfg = _model_config(tok)
    ds = _dataset(root, tok, cfg)
    low = ds[0]
    windows = low["videos"][0]  # [w, n_mels + 1, F]: 2.5 s in 1 s windows, the mask as the last row
    assert windows.shape == (3, 17, 100) and windows[:, -1].sum(-1).tolist() == [100.0, 100.0, 50.0]
    expected = cfg.num_audio_tokens(250)
    assert expected == 2 * 25 + 12 and (low["input_ids"] == tok.video_id).sum() == expected
    assert low["visual_kinds"] == ["audio"] and low["visual_spans"][0][1] == expected
    spelled = tok.decode(low["input_ids"][: low["visual_spans"][0][0]].tolist())
    assert spelled.endswith("<|audio_bos|>"), spelled  # the family's chat spelling of an audio
    assert ds[1]["videos"] == [] and ds[1]["visual_kinds"] == []
    skipped = ds[2]  # the video without an audio stream: stepped over, to the next record
    assert skipped["sample_id"] == "two" and len(skipped["bad_inputs"]) == 1
    path, message = skipped["bad_inputs"][0]
    assert path.endswith("silent.mp4") and "cannot decode audio: no audio stream" in message
    flac, track = skipped["videos"]  # the FLAC (1.5 s) and the video's 2 s AAC track (its frames pad it past 2 s)
    assert flac[:, -1].sum(-1).tolist() == [100.0, 50.0] and track[:2, -1].sum().item() == 200.0
    strict = LongVideoDataset(ds.records, tokenizer=tok, num_video_tokens=1, num_audio_tokens=cfg.num_audio_tokens,
                              config=VideoDatasetConfig(mode="rl", video_root=root, audio=_audio_config()))
    with pytest.raises(AudioDecodeError, match=r"silent\.mp4: cannot decode audio: no audio stream .*record 'silent'"):
        strict[2]


def test_audio_and_text_grpo_cp2_packed_equals_world1_unpacked(tmp_path):
    from megatron_longvideo.data.tokenizer import train_sentencepiece
    from megatron_longvideo.models import special_tokens

    tok_path = train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300, special=special_tokens("qwen2_audio"))
    _write(str(tmp_path))
    ref = run_ranks(_worker, 1, str(tmp_path), tok_path, False)[0]
    got = run_ranks(_worker, 2, str(tmp_path), tok_path, True)
    ids = [sample_id for sample_id, _, _ in ref["drawn"]]
    assert ids == ["low", "text", "two", "two"], ids  # 'silent' (no audio stream) replaced by the next good record
    assert ref["skips"] == {"audio: no audio stream": 1}, ref["skips"]
    for r in got:
        assert r["drawn"] == ref["drawn"] and r["skips"] == ref["skips"]
    _assert_same_runs(got, ref)
    m = ref["metrics"]
    assert m["train/loss"] != 0.0 and m["train/grad_norm"] > 0 and m["cache/hits_this_step"] > 0
