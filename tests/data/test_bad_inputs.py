"""Bad input, made on purpose: each gives one clear message naming the file; skip mode counts it."""

from __future__ import annotations

import json
import os
import shutil
from fractions import Fraction

import numpy as np
import pytest

from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
from megatron_longvideo.data.errors import RecordError, VideoDecodeError
from megatron_longvideo.data.loader import ResumableDataLoader
from megatron_longvideo.data.records import load_records
from megatron_longvideo.data.sampler import DistributedVideoSampler
from megatron_longvideo.data.sampling import FrameSamplingConfig
from megatron_longvideo.data.synthetic import write_synthetic_video
from megatron_longvideo.data.video import decode_video

CFG = FrameSamplingConfig(num_frames=4, image_size=16)


def _audio_only(path):
    import av

    with av.open(path, "w") as c:
        stream = c.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for p in stream.encode(frame):
                c.mux(p)
        for p in stream.encode():
            c.mux(p)


def make_bad_videos(folder, good_mp4: str, good_webm: str) -> dict[str, tuple[str, str]]:
    """name -> (path, expected message fragment)."""
    os.makedirs(folder, exist_ok=True)
    data = open(good_mp4, "rb").read()
    webm = open(good_webm, "rb").read()
    bad = {}

    def put(name, content, fragment):
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(content)
        bad[name] = (path, fragment)

    bad["missing.mp4"] = (os.path.join(folder, "missing.mp4"), "file not found")
    put("empty.mp4", b"", r"file is empty \(0 bytes\)")
    put("truncated.mp4", data[: len(data) // 2], "not a readable video container")  # index (moov) at the end
    put("truncated.webm", webm[: len(webm) * 2 // 3], "truncated or corrupt")
    put("text.mp4", b"this is a text file, not a video\n" * 20, "not a readable video container")
    # Replacing the codec's fourcc leaves a valid container whose stream no decoder reads.
    assert b"avc1" in data  # the compatible-brands list and the sample description
    put("unknown_codec.mp4", data.replace(b"avc1", b"qqq1"), "unsupported codec")
    audio = os.path.join(folder, "audio_only.m4a")
    _audio_only(audio)
    bad["audio_only.m4a"] = (audio, r"no video stream \(streams found: audio\)")
    return bad


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good_mp4, good_webm = str(root / "good.mp4"), str(root / "good.webm")
    write_synthetic_video(good_mp4, num_frames=40, size=32, seed=1)
    write_synthetic_video(good_webm, num_frames=40, size=32, codec="vp9", seed=1)
    return root, good_mp4, make_bad_videos(str(root / "videos"), good_mp4, good_webm)


@pytest.mark.parametrize("name", ["missing.mp4", "empty.mp4", "truncated.mp4", "truncated.webm", "text.mp4",
                                  "unknown_codec.mp4", "audio_only.m4a"])
def test_each_bad_video_has_one_clear_message(videos, name):
    _, _, bad = videos
    path, fragment = bad[name]
    with pytest.raises(VideoDecodeError, match=fragment) as e:
        decode_video(path, CFG)
    msg = str(e.value)
    assert msg.startswith(path + ": cannot decode video: ") and msg.count("\n") == 0
    assert e.value.path == path


def test_truncated_webm_decodes_when_not_strict(videos):
    _, _, bad = videos
    out = decode_video(bad["truncated.webm"][0], FrameSamplingConfig(num_frames=4, image_size=16,
                                                                      strict_frame_count=False))
    assert len(out.indices) == 4 and out.indices[-1] < 40


def test_frame_size_over_the_limit(videos):
    _, good, _ = videos
    with pytest.raises(VideoDecodeError, match="frame size 32x32 exceeds the limit max_frame_side=24"):
        decode_video(good, FrameSamplingConfig(num_frames=4, image_size=16, max_frame_side=24))


def _write_records(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def _qa(pid, video, answer="B"):
    return {"problem_id": pid, "data_type": "video", "videos": video, "problem_type": "multiple choice",
            "problem": "What colour is the shape?\nA. red\nB. green\nC. blue", "answer": answer,
            "reasoning": "It is green."}


def test_answer_not_among_options_is_a_bad_record(tmp_path):
    path = str(tmp_path / "qa.jsonl")
    _write_records(path, [_qa("a", "v.mp4"), _qa("b", "v.mp4", answer="D")])
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert str(e.value) == f"{path}:2: bad record: field 'answer': 'D' is not among the options A, B, C"
    assert (e.value.line, e.value.field) == (2, "answer")


def test_skip_mode_keeps_going_and_counts(videos, tokenizer, tmp_path):
    """Records: 3 good, 4 bad. Videos: 7 bad files. A DP=2 run in workers delivers full batches only."""
    root, good, bad = videos
    video_root = str(tmp_path / "videos")
    shutil.copytree(os.path.dirname(bad["empty.mp4"][0]), video_root)
    for k in range(3):
        shutil.copy(good, os.path.join(video_root, f"good{k}.mp4"))
    rows = [_qa(f"good{k}", f"good{k}.mp4") for k in range(3)]
    rows += [_qa(f"bad-{name}", name) for name in bad if name != "missing.mp4"]  # 6 bad videos
    rows += [
        _qa("no-answer-in-options", "good0.mp4", answer="Z"),
        "{not json",
        {**_qa("no-video", "missing.mp4")},  # file missing: a record error at load time
        {k: v for k, v in _qa("no-problem", "good0.mp4").items() if k != "problem"},
    ]
    path = str(tmp_path / "qa.jsonl")
    _write_records(path, rows)
    cfg = VideoDatasetConfig(mode="sft", video_root=video_root, sampling=CFG, on_error="skip")
    ds = LongVideoDataset.from_file(path, tokenizer=tokenizer, num_video_tokens=lambda t: 2 * t + 1, config=cfg)
    assert len(ds) == 9 and ds.skip_report.num_bad_records == 4
    messages = "\n".join(ds.skip_report.messages)
    assert f"{path}:10: bad record: field 'answer'" in messages and f"{path}:11: bad record: invalid JSON" in messages
    assert "field 'videos': video file not found" in messages and "field 'problem': missing" in messages

    delivered = []
    for dp_rank in range(2):
        sampler = DistributedVideoSampler(len(ds), dp_rank=dp_rank, dp_size=2, seed=0, shuffle=False, drop_last=False)
        loader = ResumableDataLoader(ds, sampler, micro_batch_size=1, num_workers=2, skip_report=ds.skip_report)
        for batch in loader:
            assert batch["sample_id"][0].startswith("good") and batch["videos"][0][0].shape == (4, 3, 16, 16)
            delivered.append(batch["sample_id"][0])
    assert len(delivered) == 10  # 9 records, padded to 10 for DP=2, all served by good samples
    report = ds.skip_report
    assert report.num_bad_videos == 6 and report.num_bad_records == 4 and report.total == 10
    assert report.summary().startswith("skipped 10 bad inputs: 4 records, 6 videos")
    for name, (p, _) in bad.items():
        if name != "missing.mp4":
            assert p.replace(os.path.dirname(p), video_root) in report.bad_videos


def test_raise_mode_names_file_and_record(videos, tokenizer, tmp_path):
    root, good, bad = videos
    video_root = os.path.dirname(bad["empty.mp4"][0])
    path = str(tmp_path / "qa.jsonl")
    _write_records(path, [_qa("v-text", "text.mp4")])
    cfg = VideoDatasetConfig(mode="rl", video_root=video_root, sampling=CFG, on_error="raise")
    ds = LongVideoDataset.from_file(path, tokenizer=tokenizer, num_video_tokens=3, config=cfg)
    with pytest.raises(VideoDecodeError) as e:
        ds[0]
    assert os.path.join(video_root, "text.mp4") in str(e.value)
    assert f"record 'v-text' at {path}:1" in str(e.value)
    # through worker processes the same exception type and message reach the caller
    sampler = DistributedVideoSampler(1, dp_rank=0, dp_size=1, shuffle=False)
    with pytest.raises(VideoDecodeError, match="text.mp4: cannot decode video"):
        next(iter(ResumableDataLoader(ds, sampler, num_workers=1)))


def test_skip_mode_gives_up_on_all_bad_data(videos, tokenizer, tmp_path):
    _, _, bad = videos
    video_root = os.path.dirname(bad["empty.mp4"][0])
    path = str(tmp_path / "qa.jsonl")
    _write_records(path, [_qa("e", "empty.mp4"), _qa("t", "text.mp4")])
    cfg = VideoDatasetConfig(mode="rl", video_root=video_root, sampling=CFG, on_error="skip", max_consecutive_skips=3)
    ds = LongVideoDataset.from_file(path, tokenizer=tokenizer, num_video_tokens=3, config=cfg)
    with pytest.raises(VideoDecodeError, match="4 consecutive bad videos from item 0"):
        ds[0]
