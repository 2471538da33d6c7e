"""The synthetic dataset: deterministic, fast, and the answers really are in the pixels."""

from __future__ import annotations

import importlib.util
import json
import os

import torch

from megatron_longvideo.data.records import load_records
from megatron_longvideo.data.sampling import FrameSamplingConfig
from megatron_longvideo.data.synthetic import BACKGROUND, COLOURS, SyntheticDatasetConfig, make_synthetic_dataset
from megatron_longvideo.data.video import decode_video, probe_video


def _colour_in_frames(frames_uint8: torch.Tensor) -> str | None:
    """The named colour nearest to the mean of the pixels that are far from the grey background."""
    x = frames_uint8.permute(0, 2, 3, 1).reshape(-1, 3).float()  # [T*H*W, 3]
    fg = x[(x - torch.tensor(BACKGROUND, dtype=torch.float)).abs().max(dim=1).values > 40]
    if fg.shape[0] == 0:
        return None
    mean = fg.mean(dim=0)
    return min(COLOURS, key=lambda c: float(((mean - torch.tensor(COLOURS[c], dtype=torch.float)) ** 2).sum()))


def test_answers_are_in_the_video(synth):
    cfg = FrameSamplingConfig(num_frames=8, image_size=32, mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    records = [r for r in load_records(synth.qa_path, video_root=synth.video_root).records
               if r.problem_id.endswith("-colour")]
    assert len(records) == len(synth.video_paths)
    for rec in records:
        out = decode_video(os.path.join(synth.video_root, rec.video), cfg)  # back on the 0..255 scale
        colour = _colour_in_frames(out.frames)
        assert colour is not None, f"{rec.video}: the shape is not visible in 8 uniformly sampled frames"
        assert dict(rec.options)[rec.answer] == colour
        assert colour in rec.reasoning


def test_deterministic_for_a_seed(tmp_path):
    cfg = SyntheticDatasetConfig(num_videos=3, min_frames=16, max_frames=24, tasks=("colour", "count"), seed=9)
    a = make_synthetic_dataset(str(tmp_path / "a"), cfg)
    b = make_synthetic_dataset(str(tmp_path / "b"), cfg)
    assert open(a.qa_path).read() == open(b.qa_path).read()
    assert open(a.caption_path).read() == open(b.caption_path).read()
    fs = FrameSamplingConfig(num_frames=100, image_size=32)
    for pa, pb in zip(a.video_paths, b.video_paths):
        torch.testing.assert_close(decode_video(pa, fs).frames, decode_video(pb, fs).frames, atol=0, rtol=0)
    c = make_synthetic_dataset(str(tmp_path / "c"), SyntheticDatasetConfig(**{**cfg.__dict__, "seed": 10}))
    assert open(c.qa_path).read() != open(a.qa_path).read()
    lengths = [probe_video(p).num_frames for p in a.video_paths]
    assert all(16 <= n <= 24 for n in lengths)
    counts = [json.loads(l) for l in open(a.qa_path) if "-count" in l]
    assert all(r["problem_type"] == "numerical" and 1 <= int(r["answer"]) <= 3 for r in counts)


def test_cli_writes_videos_records_and_tokenizer(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "..", "..", "tools", "make_synthetic_dataset.py")
    spec = importlib.util.spec_from_file_location("make_synthetic_dataset", script)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "ds"
    assert tool.main(["--out", str(out), "--num-videos", "4", "--codec", "vp9", "--size", "48",
                      "--tasks", "colour,shape"]) == 0
    assert sorted(os.listdir(out / "videos")) == [f"synth{i:05d}.webm" for i in range(4)]
    assert probe_video(str(out / "videos" / "synth00000.webm")).codec == "vp9"
    assert len(load_records(str(out / "qa.jsonl"), video_root=str(out / "videos")).records) == 8
    assert os.path.exists(out / "tokenizer.model")
