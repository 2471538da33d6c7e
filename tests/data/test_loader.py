"""Dataset modes, the DP-aware resumable sampler, worker-process loading, and the pre-decode cache."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from megatron_longvideo.data import cache
from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
from megatron_longvideo.data.loader import ResumableDataLoader
from megatron_longvideo.data.prompts import IGNORE_INDEX
from megatron_longvideo.data.sampler import DistributedVideoSampler
from megatron_longvideo.data.sampling import FrameSamplingConfig

SAMPLING = FrameSamplingConfig(num_frames=6, image_size=16)


def dataset(synth, tokenizer, mode="sft", **kw):
    path = synth.caption_path if mode == "pretrain" else synth.qa_path
    cfg = VideoDatasetConfig(mode=mode, video_root=synth.video_root, sampling=SAMPLING, **kw)
    return LongVideoDataset.from_file(path, tokenizer=tokenizer, num_video_tokens=lambda t: 3 * t + 1, config=cfg)


@pytest.mark.parametrize("dp_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_shards_cover_the_epoch(dp_size, drop_last):
    n = 10
    samplers = [DistributedVideoSampler(n, dp_rank=r, dp_size=dp_size, seed=7, drop_last=drop_last)
                for r in range(dp_size)]
    shards = [list(s) for s in samplers]
    assert len({len(s) for s in shards}) == 1, "every rank gets the same count"
    flat = [i for s in shards for i in s]
    if drop_last:
        assert len(flat) == len(set(flat)) == n - n % dp_size
    else:
        assert set(flat) == set(range(n)) and len(flat) == -(-n // dp_size) * dp_size
    # A TP / CP peer of rank 0 (same dp_rank) reads the same samples in the same order.
    assert list(DistributedVideoSampler(n, dp_rank=0, dp_size=dp_size, seed=7, drop_last=drop_last)) == shards[0]


def test_sampler_seed_and_epoch():
    s = DistributedVideoSampler(50, dp_rank=0, dp_size=1, seed=1)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == sorted(e1) == list(range(50)) and e0 != e1
    assert list(DistributedVideoSampler(50, dp_rank=0, dp_size=1, seed=2)) != e0
    s.set_epoch(0)
    assert list(s) == e0


def test_sampler_resume_and_change_of_dp_size():
    full = DistributedVideoSampler(24, dp_rank=1, dp_size=2, seed=3)
    expected = list(full)
    s = DistributedVideoSampler(24, dp_rank=1, dp_size=2, seed=3)
    s.advance(8)
    state = s.state_dict()
    resumed = DistributedVideoSampler(24, dp_rank=1, dp_size=2, seed=3)
    resumed.load_state_dict(state)
    assert list(resumed) == expected[4:]
    # Same global order when resuming on 4 ranks: rank r continues at global position 8 + r.
    order = full.epoch_order(0)
    for r in range(4):
        s4 = DistributedVideoSampler(24, dp_rank=r, dp_size=4, seed=3)
        s4.load_state_dict(state)
        assert list(s4) == order[8 + r :: 4]
    with pytest.raises(ValueError, match="not a multiple of dp_size=3"):
        DistributedVideoSampler(24, dp_rank=0, dp_size=3, seed=3).load_state_dict({**state, "consumed_samples": 8})
    with pytest.raises(ValueError, match="saved seed=3"):
        DistributedVideoSampler(24, dp_rank=0, dp_size=2, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_rank must be in"):
        DistributedVideoSampler(24, dp_rank=2, dp_size=2)


def test_modes(synth, tokenizer):
    sft = dataset(synth, tokenizer, "sft")[0]
    assert sft["videos"][0].shape == (6, 3, 16, 16) and sft["frame_indices"][0].shape == (6,)
    assert sft["num_video_tokens"] == 19 and (sft["input_ids"] == tokenizer.video_id).sum() == 19
    assert (sft["labels"] != IGNORE_INDEX).any() and sft["ground_truth"] is None
    rl = dataset(synth, tokenizer, "rl")[0]
    assert rl["labels"] is None and rl["ground_truth"].problem_id == rl["sample_id"]
    pre = dataset(synth, tokenizer, "pretrain")[0]
    assert pre["sample_id"].endswith("-caption") and (pre["labels"] != IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="mode must be one of"):
        VideoDatasetConfig(mode="dpo", video_root="x")


def _ids(loader, num_batches=None):
    return [batch["sample_id"] for batch in itertools.islice(loader, num_batches)]


def test_loader_in_workers_is_resumable(synth, tokenizer):
    ds = dataset(synth, tokenizer, "rl")
    assert len(ds) == 24

    def make():
        sampler = DistributedVideoSampler(len(ds), dp_rank=1, dp_size=2, seed=11)
        return ResumableDataLoader(ds, sampler, micro_batch_size=2, num_workers=2)

    reference = make()
    whole = _ids(reference)  # one epoch: 24 / 2 ranks / 2 per batch = 6 batches
    assert len(whole) == 6 and reference.sampler.epoch == 1

    first = make()
    head = _ids(first, num_batches=2)
    state = first.state_dict()
    assert state["consumed_samples"] == 2 * 2 * 2  # 2 batches x 2 samples x 2 DP ranks
    second = make()
    second.load_state_dict(state)
    assert head + _ids(second) == whole

    batch = next(iter(make()))
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"].dtype == torch.bool
    for b in range(2):
        n = int(batch["attention_mask"][b].sum())
        assert (batch["input_ids"][b, n:] == tokenizer.pad_id).all()
        start, count = int(batch["video_start"][b]), int(batch["num_video_tokens"][b])
        assert (batch["input_ids"][b, start : start + count] == tokenizer.video_id).all()
        assert count == 3 * batch["videos"][b][0].shape[0] + 1


def test_predecode_cache_with_progress(synth, tokenizer, tmp_path):
    cache_dir = str(tmp_path / "cache")
    ds = dataset(synth, tokenizer, "rl", cache_dir=cache_dir)
    lines = []
    report = cache.predecode(ds, num_workers=2, log=lines.append, every_seconds=0.0)
    assert report.total == 0
    assert any(line.startswith(f"predecode: {len(synth.video_paths)}/{len(synth.video_paths)} videos (100.0%)")
               for line in lines)
    assert len([f for f in os.listdir(cache_dir) if f.endswith(".pt")]) == len(synth.video_paths)
    fresh = dataset(synth, tokenizer, "rl")
    for i in (0, 5):
        torch.testing.assert_close(ds[i]["videos"][0], fresh[i]["videos"][0], atol=0, rtol=0)
        assert ds[i]["frame_indices"][0].tolist() == fresh[i]["frame_indices"][0].tolist()
    # a different sampling config misses the cache
    other = FrameSamplingConfig(num_frames=3, image_size=16)
    assert cache.cache_key(synth.video_paths[0], other, "pyav") != cache.cache_key(synth.video_paths[0], SAMPLING, "pyav")
