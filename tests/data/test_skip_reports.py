"""Skip reports: every skipped record and video counted by reason, logged rate-limited, summarised,
exported as scalars; a dataset with nothing usable says why."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
from megatron_longvideo.data.errors import RecordError, SkipReport, record_skip_reason, video_skip_reason
from megatron_longvideo.data.loader import ResumableDataLoader
from megatron_longvideo.data.sampler import DistributedVideoSampler
from megatron_longvideo.data.sampling import FrameSamplingConfig
from megatron_longvideo.data.synthetic import write_synthetic_video, write_video

CFG = FrameSamplingConfig(num_frames=4, image_size=16)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("skip_videos")
    write_synthetic_video(str(root / "good0.mp4"), num_frames=24, size=32, seed=1)
    shutil.copy(root / "good0.mp4", root / "good1.mp4")
    write_video(str(root / "short.mp4"), [np.full((32, 32, 3), 90 * i, dtype=np.uint8) for i in range(2)], fps=8)
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_bytes(b"not a video at all\n" * 10)
    return str(root)


def _qa(pid, video, answer="B", **change):
    row = {"problem_id": pid, "videos": video, "problem": "Which colour? A. red B. green C. blue", "answer": answer}
    return {k: v for k, v in {**row, **change}.items() if v is not None}


def _write(path, rows):
    with open(path, "w") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_rate_limited_log():
    lines = []
    report = SkipReport(log=lines.append, log_first=2, log_every=3)
    for i in range(10):
        report.count("video: empty file", f"v{i}.mp4: cannot decode video: file is empty (0 bytes)")
    report.count("record: invalid JSON", "qa.jsonl:3: bad record: invalid JSON")
    assert len(lines) == 6  # #1, #2, #3, #6, #9 of the first reason; #1 of the second
    assert lines[0] == "skipped input #1 for reason 'video: empty file': v0.mp4: cannot decode video: file is empty (0 bytes)"
    assert "#2 for reason 'video: empty file' (from now on one line in every 3): v1.mp4" in lines[1]
    assert [line.split(" ")[2] for line in lines[:5]] == ["#1", "#2", "#3", "#6", "#9"]
    assert report.counts() == {"video: empty file": 10, "record: invalid JSON": 1}
    other = SkipReport(log=lines.append)
    other.add_video_errors([("v0.mp4", "v0.mp4: cannot decode video: file is empty (0 bytes)"),
                            ("w.mp4", "w.mp4: cannot decode video: file not found")])
    report.merge_bad_videos({"v0.mp4": "already counted", **other.bad_videos})  # as from another DP rank
    assert len(lines) == 8 and report.counts()["video: file not found"] == 1 and report.log is not None
    quiet = SkipReport(log=None)
    quiet.count("record: x", "m")
    assert quiet.total == 1
    with pytest.raises(ValueError, match="log_every"):
        SkipReport(log_every=0)


@pytest.mark.parametrize("message,reason", [
    ("a.mp4: cannot decode video: file not found", "video: file not found"),
    ("a.mp4: cannot decode video: file is empty (0 bytes) (record 'x' at qa.jsonl:3)", "video: empty file"),
    ("a.mp4: cannot decode video: not a readable video container (truncated, corrupt or not a video: x)",
     "video: not a readable container"),
    ("a.webm: cannot decode video: truncated or corrupt: the container declares 40 frames", "video: truncated or corrupt"),
    ("a.mp4: cannot decode video: corrupt stream after frame 3: x", "video: truncated or corrupt"),
    ("a.mp4: cannot decode video: unsupported codec: FFmpeg has no decoder", "video: unsupported codec"),
    ("a.m4a: cannot decode video: no video stream (streams found: audio)", "video: no video stream"),
    ("a.mp4: cannot decode video: frame size 99x99 exceeds the limit", "video: frame too large"),
    ("a.mp4: cannot decode video: too few frames: 2 sampled, min_video_frames=4", "video: too few frames"),
    ("a.mp4: cannot decode video: decord cannot open it: x", "video: cannot decode"),
])
def test_video_reasons(message, reason):
    assert video_skip_reason(message) == reason


@pytest.mark.parametrize("field,why,reason", [
    (None, "invalid JSON (Expecting value at column 1)", "record: invalid JSON"),
    (None, "expected a JSON object, got list", "record: not a JSON object"),
    ("problem", "missing", "record: missing field problem"),
    ("answer", "'Z' is not among the options A, B", "record: answer not an option"),
    ("problem_id", "duplicate 'a' (first at line 1)", "record: duplicate problem_id"),
    ("videos", "video file not found: /v/a.mp4", "record: video file not found"),
    ("problem_type", "expected one of ...", "record: bad field problem_type"),
])
def test_record_reasons(field, why, reason):
    assert record_skip_reason(RecordError("qa.jsonl", 3, field, why)) == reason


def test_dataset_counts_each_reason(video_root, tokenizer, tmp_path):
    path = _write(tmp_path / "qa.jsonl", [
        _qa("good0", "good0.mp4"),                              # 1
        _qa("good1", "good1.mp4"),                              # 2
        _qa("no-problem-1", "good0.mp4", problem=None),         # 3  record: missing field problem
        _qa("no-problem-2", "good1.mp4", problem=None),         # 4  record: missing field problem
        _qa("not-an-option", "good0.mp4", answer="Z"),          # 5  record: answer not an option
        "{not json",                                            # 6  record: invalid JSON
        _qa("no-file", "missing.mp4"),                          # 7  record: video file not found
        _qa("good1", "good0.mp4"),                              # 8  record: duplicate problem_id
        _qa("no-videos", []),                                   # 9  record: bad field videos
        _qa("empty", "empty.mp4"),                              # 10 video: empty file
        _qa("text-1", "text.mp4"),                              # 11 video: not a readable container
        _qa("text-2", "text.mp4"),                              # 12 the same bad file: counted once
        _qa("short", "short.mp4"),                              # 13 video: too few frames
    ])
    lines = []
    cfg = VideoDatasetConfig(mode="rl", video_root=video_root, sampling=CFG, on_error="skip", min_video_frames=4)
    ds = LongVideoDataset.from_file(path, tokenizer=tokenizer, num_video_tokens=3, config=cfg,
                                    skip_report=SkipReport(log=lines.append))
    assert len(ds) == 6 and ds.skip_report.num_bad_records == 7 and len(lines) == 7  # logged as they are read
    sampler = DistributedVideoSampler(len(ds), dp_rank=0, dp_size=1, shuffle=False)
    served = [b["sample_id"][0] for b in ResumableDataLoader(ds, sampler, skip_report=ds.skip_report)]
    assert served == ["good0", "good1", "good0", "good0", "good0", "good0"]
    report = ds.skip_report
    assert report.counts() == {
        "record: missing field problem": 2, "record: answer not an option": 1, "record: invalid JSON": 1,
        "record: video file not found": 1, "record: duplicate problem_id": 1, "record: bad field videos": 1,
        "video: empty file": 1, "video: not a readable container": 1, "video: too few frames": 1,
    }
    assert len(lines) == 10 and lines[-1].startswith("skipped input #1 for reason 'video: too few frames': ")
    assert "too few frames: 2 sampled, min_video_frames=4 (record 'short' at" in lines[-1]
    summary = report.summary(top=2).splitlines()
    assert summary == [
        "skipped 10 bad inputs: 7 records, 3 videos",
        f"  2 x record: missing field problem, e.g. {path}:3: bad record: field 'problem': missing",
        f"  1 x record: answer not an option, e.g. {path}:5: bad record: field 'answer': 'Z' is not among the options "
        "A, B, C (problem_type inferred as multiple choice from the options; set problem_type to override)",
        "  ... and 7 more reasons",
    ]
    scalars = report.as_scalars()
    assert scalars["data/skipped/total"] == 10 and scalars["data/skipped/records"] == 7
    assert scalars["data/skipped/videos"] == 3 and scalars["data/skipped/record/missing_field_problem"] == 2
    assert scalars["data/skipped/video/not_a_readable_container"] == 1 and len(scalars) == 3 + 9
    assert set(report.as_scalars(prefix="skip/")) == {k.replace("data/skipped/", "skip/") for k in scalars}


def test_nothing_usable_names_the_reasons(video_root, tokenizer, tmp_path):
    cfg = VideoDatasetConfig(mode="rl", video_root=video_root, sampling=CFG, on_error="skip")
    path = _write(tmp_path / "bad.jsonl", [_qa("a", "good0.mp4", problem=None), "[1, 2",
                                           _qa("b", "good0.mp4", problem=None)])
    with pytest.raises(ValueError) as e:
        LongVideoDataset.from_file(path, tokenizer=tokenizer, num_video_tokens=3, config=cfg,
                                   skip_report=SkipReport(log=None))
    assert str(e.value).splitlines() == [
        f"{path}: no usable record: all 3 records were skipped (on_error='skip'); the top reasons:",
        f"  2 x record: missing field problem, e.g. {path}:1: bad record: field 'problem': missing",
        f"  1 x record: invalid JSON, e.g. {path}:2: bad record: invalid JSON (Expecting ',' delimiter at column 6)",
    ]
    empty = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="empty.jsonl: the file holds no records"):
        LongVideoDataset.from_file(empty, tokenizer=tokenizer, num_video_tokens=3, config=cfg)


def test_all_bad_videos_names_the_reasons(video_root, tokenizer, tmp_path):
    path = _write(tmp_path / "qa.jsonl", [_qa("e", "empty.mp4"), _qa("t", "text.mp4")])
    cfg = VideoDatasetConfig(mode="rl", video_root=video_root, sampling=CFG, on_error="skip", max_consecutive_skips=3)
    ds = LongVideoDataset.from_file(path, tokenizer=tokenizer, num_video_tokens=3, config=cfg)
    with pytest.raises(ValueError, match=r"4 consecutive bad videos from item 0 .*the data looks broken "
                                         r"\(2 x video: empty file, 2 x video: not a readable container\)"):
        ds[0]


def test_prompt_stream_counts_skipped_videos(video_root, tokenizer, tmp_path):
    from megatron_longvideo.rl.prompt_stream import PromptStream

    path = _write(tmp_path / "qa.jsonl", [_qa("e", "empty.mp4"), _qa("g", "good0.mp4")])
    cfg = VideoDatasetConfig(mode="rl", video_root=video_root, sampling=CFG, on_error="skip")
    ds = LongVideoDataset.from_file(path, tokenizer=tokenizer, num_video_tokens=3, config=cfg)
    stream = PromptStream(ds, DistributedVideoSampler(len(ds), dp_rank=0, dp_size=1, shuffle=False))
    assert stream.skip_report is ds.skip_report
    prompts = stream.draw(4)  # two epochs: the empty video is met twice, counted once
    assert [p.sample_id for p in prompts] == ["g"] * 4
    assert stream.skip_report.counts() == {"video: empty file": 1}
    assert os.path.join(video_root, "empty.mp4") in stream.skip_report.bad_videos
