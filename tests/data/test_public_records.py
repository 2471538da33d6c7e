"""The public LongVideo-Reason files load as released: JSON or JSONL, ``videos`` a string or a list,
``problem_id`` / ``problem_type`` optional, wrapped answers; and ``fps``-only frame sampling."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest

from megatron_longvideo.data.cache import cache_key
from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
from megatron_longvideo.data.errors import RecordError
from megatron_longvideo.data.records import derive_problem_id, infer_problem_type, load_records
from megatron_longvideo.data.sampling import DEFAULT_NUM_FRAMES, FrameSamplingConfig
from megatron_longvideo.data.synthetic import write_synthetic_video

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
JSONL = os.path.join(FIXTURES, "longvideo_reason_public.jsonl")  # only problem, reasoning, videos, answer
JSON_LIST = os.path.join(FIXTURES, "longvideo_reason_public.json")  # + integer problem_id, problem_type "general"


def _rows(path):
    with open(path) as f:
        return json.load(f) if path.endswith(".json") else [json.loads(line) for line in f if line.strip()]


def test_public_jsonl_loads():
    records = load_records(JSONL).records
    rows = _rows(JSONL)
    assert [r.video for r in records] == ["longvila_videos/workshop_01.mp4", "longvila_videos/track_07.mp4",
                                          "longvila_videos/kitchen_3.webm", "longvila_videos/trail_12.mkv"]
    assert isinstance(rows[0]["videos"], str) and isinstance(rows[1]["videos"], list)
    assert [r.problem_type for r in records] == ["multiple choice", "numerical", "free-form", "multiple choice"]
    assert [r.answer for r in records] == ["B", "4", rows[2]["answer"], "B"]  # "<answer>B</answer>" -> "B"
    assert [k for k, _ in records[0].options] == ["A", "B", "C", "D"] and records[0].options_inline
    assert records[3].options == (("A", "sunny"), ("B", "foggy"), ("C", "snowing"))
    assert all(r.reasoning for r in records)
    assert [r.problem_id for r in records] == [derive_problem_id(r.video, r.problem) for r in records]
    assert records[0].problem_id.startswith("workshop_01-") and len(records[0].problem_id) == len("workshop_01-") + 10


def test_public_json_list_loads():
    records = load_records(JSON_LIST, require_reasoning=True).records
    assert [r.problem_id for r in records] == ["0", "1", "2"]  # integer ids kept, as text
    assert [r.video for r in records] == ["longvila_videos/match_44.mp4", "longvila_videos/game_9.mp4",
                                          "longvila_videos/vlog_21.mp4"]
    # problem_type "general" is inferred; "<answer>A</answer>", "B. a worker" and "<answer>2</answer>" normalised
    assert [(r.problem_type, r.answer) for r in records] == [("multiple choice", "A"), ("multiple choice", "B"),
                                                            ("numerical", "2")]


def test_derived_ids_unique_and_stable(tmp_path):
    rows = _rows(JSONL)
    first = {r.video: r.problem_id for r in load_records(JSONL).records}
    assert first == {r.video: r.problem_id for r in load_records(JSONL).records}  # same on every load
    assert len(set(first.values())) == len(rows)
    # reordered, and in a JSON list, the ids stay with their questions; a repeated question gets "-2"
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps([rows[0], *rows[::-1]], indent=1))
    records = load_records(str(moved)).records
    ids = [r.problem_id for r in records]
    assert ids[:-1] == [first[r.video] for r in records[:-1]]
    assert ids[-1] == ids[0] + "-2"
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("problem,answer,options,expected", [
    ("Which? A. red B. green", "B", False, "multiple choice"),
    ("Which one?", "red", True, "multiple choice"),
    ("How many?", "1,200", False, "numerical"),
    ("How far?", "-2.5", False, "numerical"),
    ("How many?", "nan", False, "free-form"),
    ("What happens?", "a dog runs", False, "free-form"),
])
def test_infer_problem_type(problem, answer, options, expected):
    assert infer_problem_type(problem, answer, has_options_field=options) == expected


def _write(tmp_path, rows, name="qa.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_public_shape_errors_and_aliases(tmp_path):
    base = {"problem": "Which? A. red B. green", "videos": "v.mp4", "answer": "B"}
    path = _write(tmp_path, [
        {**base, "answer": "C"},  # inferred multiple choice, not an option
        {**base, "answer": "<answer> </answer>"},
        {"problem": "How many?", "videos": "v.mp4", "solution": "<answer>3</answer>"},  # R1-V style answer key
        {**base, "problem_type": "essay"},  # an explicit type is still checked
    ])
    result = load_records(path, on_error="skip")
    assert [(e.line, e.field) for e in result.errors] == [(1, "answer"), (2, "answer"), (4, "problem_type")]
    assert str(result.errors[0]) == (f"{path}:1: bad record: field 'answer': 'C' is not among the options A, B "
                                     "(problem_type inferred as multiple choice from the options; set problem_type "
                                     "to override)")
    assert "empty answer inside <answer></answer>" in str(result.errors[1])
    (rec,) = result.records
    assert (rec.problem_type, rec.answer) == ("numerical", "3")


def test_video_root_resolution(tmp_path):
    root = tmp_path / "root"
    (root / "longvila_videos").mkdir(parents=True)
    (root / "longvila_videos" / "a.mp4").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere.mp4"
    elsewhere.write_bytes(b"x")
    base = {"problem": "What happens?", "answer": "a dog runs"}
    path = _write(tmp_path, [{**base, "videos": "longvila_videos/a.mp4"}, {**base, "videos": [str(elsewhere)]},
                             {**base, "videos": "longvila_videos/missing.mp4"}])
    result = load_records(path, video_root=str(root), on_error="skip")
    assert [r.video for r in result.records] == ["longvila_videos/a.mp4", str(elsewhere)]
    (err,) = result.errors
    assert str(err) == (f"{path}:3: bad record: field 'videos': video file not found: "
                        f"{os.path.join(str(root), 'longvila_videos/missing.mp4')}")


def test_public_file_through_the_dataset(tmp_path, tokenizer):
    root = tmp_path / "videos"
    (root / "longvila_videos").mkdir(parents=True)
    source = str(tmp_path / "src.mp4")
    write_synthetic_video(source, num_frames=16, size=32)
    for rec in load_records(JSONL).records:
        shutil.copy(source, root / rec.video)  # FFmpeg probes the content, not the extension
    cfg = VideoDatasetConfig(mode="rl", video_root=str(root), sampling=FrameSamplingConfig(fps=2.0, image_size=16))
    ds = LongVideoDataset.from_file(JSONL, tokenizer=tokenizer, num_video_tokens=3, config=cfg)
    samples = [ds[i] for i in range(len(ds))]
    assert [s["ground_truth"].answer for s in samples] == [r.answer for r in ds.records]
    assert [s["ground_truth"].problem_type for s in samples][:2] == ["multiple choice", "numerical"]
    assert [s["videos"][0].shape[0] for s in samples] == [4] * 4  # 16 frames at 8 fps, sampled at 2 fps
    assert ds.skip_report.total == 0


def test_fps_only_sampling_config():
    cfg = FrameSamplingConfig(fps=2.0)
    assert (cfg.num_frames, cfg.fps) == (None, 2.0)
    default = FrameSamplingConfig()
    assert (default.num_frames, default.fps) == (DEFAULT_NUM_FRAMES, None) == (64, None)
    assert FrameSamplingConfig(num_frames=None).num_frames == 64
    with pytest.raises(ValueError, match=r"exactly one of num_frames and fps may be set .* num_frames=8, fps=1.0"):
        FrameSamplingConfig(num_frames=8, fps=1.0)
    assert dataclasses.replace(default, num_frames=None, fps=1.0).fps == 1.0
    # the resolved default is what the cache key sees, as when num_frames=64 was the field's default
    assert cache_key("v.mp4", default, "pyav") == cache_key("v.mp4", FrameSamplingConfig(num_frames=64), "pyav")


def test_record_error_for_bad_public_record_is_raised(tmp_path):
    path = _write(tmp_path, [{"videos": "v.mp4", "answer": "B"}])
    with pytest.raises(RecordError, match=r":1: bad record: field 'problem': missing"):
        load_records(path)
