"""One probe per video per encode group (``data/probe_cache.py``): a rank that reads the group's published
probe holds what a fresh probe gives and decodes the same frames bit for bit without opening the file to
probe or demux it; a changed file, a corrupt entry or a rank 0 that never publishes all end in a probe
of the rank's own, with the same result. Nothing here depends on timing: the follower that finds the
entry while waiting is driven through a patched ``sleep``, and the fallbacks assert results only.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from megatron_longvideo.data import backends, probe_cache
from megatron_longvideo.data import video as video_module
from megatron_longvideo.data.cache import cache_key
from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
from megatron_longvideo.data.errors import VideoDecodeError
from megatron_longvideo.data.frames import FrameShard
from megatron_longvideo.data.probe_cache import probe_shared
from megatron_longvideo.data.sampling import FrameSamplingConfig
from megatron_longvideo.data.synthetic import write_synthetic_video
from megatron_longvideo.data.video import decode_video, probe_lazy
from tests.dist import run_ranks

CFG = FrameSamplingConfig(num_frames=10, image_size=32)
NAMES = ("a.mp4", "b.webm")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_sharing")
    write_synthetic_video(str(root / "a.mp4"), num_frames=120, size=48, seed=1)
    write_synthetic_video(str(root / "b.webm"), num_frames=50, size=40, codec="vp9", seed=2)
    write_synthetic_video(str(root / "c.mp4"), num_frames=30, size=32, seed=3)
    return str(root)


@pytest.fixture
def no_file_access(monkeypatch):
    """Make probing or demuxing a file fail loudly: a rank reading the shared probe must do neither."""
    def refuse(*args, **kwargs):
        raise AssertionError("the file was probed or demuxed")

    def forbid():
        monkeypatch.setattr(video_module, "probe_video", refuse)
        monkeypatch.setattr(backends, "frame_table", refuse)

    return forbid


def _same_probe(a, b) -> None:
    """``a`` (shared) holds what ``b`` (a rank's own probe) holds; a table ``a`` carries is the one ``b``'s
    file gives (``b`` builds it if it has not)."""
    assert a.info == b.info and a.indices == b.indices and a.size == b.size and a.shape == b.shape
    assert a.timestamps == b.timestamps and a.config == b.config and a.backend == b.backend
    ta = a.packet_table
    if ta is None:
        return
    tb = b.frame_table()
    if ta is False:
        assert tb is False
    else:
        assert np.array_equal(ta.pts, tb.pts) and ta.pts.dtype == tb.pts.dtype == np.int64
        assert np.array_equal(ta.keyframes, tb.keyframes) and ta.open_gop == tb.open_gop


@pytest.mark.parametrize("name", NAMES)
def test_a_shared_probe_equals_a_fresh_one_and_the_follower_never_opens_the_file(videos, name, tmp_path,
                                                                                 no_file_access):
    path, folder, size = os.path.join(videos, name), str(tmp_path / "probe"), 3
    full = decode_video(path, CFG)
    fresh = probe_lazy(path, CFG)
    leader = probe_shared(path, CFG, probe_dir=folder, shard=FrameShard(rank=0, size=size))
    assert leader.num_probes == 1 and leader.num_tables_built == 1  # a later rank's slice seeks: built once
    _same_probe(leader, fresh)

    no_file_access()
    pieces = []
    for rank in range(size):  # rank 0 too: a later epoch, where no rank probes
        shard = FrameShard(rank=rank, size=size)
        follower = probe_shared(path, CFG, probe_dir=folder, shard=shard, wait_s=0)
        assert follower.num_probes == 0 and follower.num_decoded == 0
        _same_probe(follower, fresh)
        follower.decode_shard(shard)
        assert follower.num_tables_built == 0  # the seeking slices used the shared table
        pieces.append(follower.frames(*shard.frames_of(len(follower))))
        again = pickle.loads(pickle.dumps(follower))  # as a DataLoader worker sends it
        assert again.num_probes == 0 and again.packet_table is not None
    assert torch.equal(torch.cat(pieces), full.frames)


def test_a_follower_that_finds_the_entry_while_waiting_uses_it(videos, tmp_path, monkeypatch, no_file_access):
    path, folder = os.path.join(videos, "a.mp4"), str(tmp_path / "probe")
    published = probe_lazy(path, CFG)
    sleeps = []

    def rank0_publishes(seconds):  # rank 0 publishes while rank 1 waits: no clock involved
        sleeps.append(seconds)
        if len(sleeps) == 2:
            probe_cache.publish(folder, cache_key(path, CFG, "pyav"), published,
                                (os.stat(path).st_size, os.stat(path).st_mtime_ns))

    monkeypatch.setattr(probe_cache.time, "sleep", rank0_publishes)
    no_file_access()
    follower = probe_shared(path, CFG, probe_dir=folder, shard=FrameShard(rank=1, size=2), wait_s=1e9)
    assert follower.num_probes == 0 and len(sleeps) == 2  # found on the poll after the second sleep
    _same_probe(follower, published)


def test_a_follower_that_waits_in_vain_probes_itself_with_the_same_result(videos, tmp_path):
    path, folder = os.path.join(videos, "a.mp4"), str(tmp_path / "probe")
    shard = FrameShard(rank=1, size=2)
    with pytest.warns(UserWarning, match="probes itself"):
        alone = probe_shared(path, CFG, probe_dir=folder, shard=shard, wait_s=0.01, poll_s=0.001)
    assert alone.num_probes == 1
    _same_probe(alone, probe_lazy(path, CFG))
    alone.decode_shard(shard)
    assert torch.equal(alone.frames(*shard.frames_of(10)), decode_video(path, CFG).frames[5:])
    later = probe_shared(path, CFG, probe_dir=folder, shard=shard, wait_s=0)  # it published what it probed
    assert later.num_probes == 0


def test_a_changed_file_is_probed_afresh(videos, tmp_path):
    path, folder = str(tmp_path / "v.mp4"), str(tmp_path / "probe")
    shutil.copy(os.path.join(videos, "a.mp4"), path)
    probe_shared(path, CFG, probe_dir=folder, shard=FrameShard(rank=0, size=2))
    old_entry = os.path.join(folder, cache_key(path, CFG, "pyav") + ".probe")

    shutil.copy(os.path.join(videos, "c.mp4"), path)  # another video under the same name: size and mtime change
    with pytest.warns(UserWarning, match="probes itself"):
        changed = probe_shared(path, CFG, probe_dir=folder, shard=FrameShard(rank=1, size=2), wait_s=0)
    assert changed.num_probes == 1 and changed.info.num_frames == 30
    _same_probe(changed, probe_lazy(path, CFG))

    # the same bytes, a new mtime; and the old entry copied under the new key: its recorded stamp refuses it
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    shutil.copy(old_entry, os.path.join(folder, cache_key(path, CFG, "pyav") + ".probe"))
    with pytest.warns(UserWarning, match="probes itself"):
        touched = probe_shared(path, CFG, probe_dir=folder, shard=FrameShard(rank=1, size=2), wait_s=0)
    assert touched.num_probes == 1 and touched.info.num_frames == 30
    # another sampling is another entry
    other = FrameSamplingConfig(num_frames=6, image_size=32)
    assert probe_shared(path, other, probe_dir=folder, shard=FrameShard(rank=0, size=2)).num_probes == 1


def _garbage(p):
    with open(p, "wb") as f:
        f.write(b"\x00not a torch file" * 10)


def _truncated(p):
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])


def _foreign(p):
    with open(p, "w") as f:
        f.write(json.dumps({"version": 1, "frames": [0, 1]}) + "\n")


def _bad_indices(p):
    line, body = open(p, "rb").read().split(b"\n", 1)
    entry = json.loads(line)
    entry["indices"] = [3, 2, 1]
    with open(p, "wb") as f:
        f.write(json.dumps(entry).encode() + b"\n" + body)


def _short_table(p):
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[:-8])


@pytest.mark.parametrize("spoil", [_garbage, _truncated, _foreign, _bad_indices, _short_table])
def test_a_corrupt_entry_is_a_miss_and_is_rewritten(videos, tmp_path, spoil):
    path, folder = os.path.join(videos, "a.mp4"), str(tmp_path / "probe")
    probe_shared(path, CFG, probe_dir=folder, shard=FrameShard(rank=0, size=2))
    key = cache_key(path, CFG, "pyav")
    spoil(os.path.join(folder, key + ".probe"))
    with open(os.path.join(folder, key + ".probe.bad.json"), "w") as f:
        f.write("{not json")  # a corrupt failure record is a miss too
    with pytest.warns(UserWarning, match="probes itself"):
        follower = probe_shared(path, CFG, probe_dir=folder, shard=FrameShard(rank=1, size=2), wait_s=0)
    assert follower.num_probes == 1
    _same_probe(follower, probe_lazy(path, CFG))
    assert probe_shared(path, CFG, probe_dir=folder, shard=FrameShard(rank=1, size=2), wait_s=0).num_probes == 0


def test_a_failed_probe_is_shared_with_its_message(tmp_path, no_file_access):
    path, folder = str(tmp_path / "text.mp4"), str(tmp_path / "probe")
    (tmp_path / "text.mp4").write_bytes(b"not a video\n" * 20)
    with pytest.raises(VideoDecodeError) as leader:
        probe_shared(path, CFG, probe_dir=folder, shard=FrameShard(rank=0, size=2))
    with pytest.raises(VideoDecodeError, match="file not found"):  # no file: nothing to share, the probe says so
        probe_shared(str(tmp_path / "missing.mp4"), CFG, probe_dir=folder, shard=FrameShard(rank=1, size=2))
    no_file_access()
    with pytest.raises(VideoDecodeError) as follower:
        probe_shared(path, CFG, probe_dir=folder, shard=FrameShard(rank=1, size=2), wait_s=1e9)
    assert str(follower.value) == str(leader.value) and "not a readable video container" in str(leader.value)


def _dataset(videos, tokenizer, shard, **config):
    path = os.path.join(videos, "qa.jsonl")
    with open(path, "w") as f:
        for i, name in enumerate(NAMES):
            f.write(json.dumps({"problem_id": f"p{i}", "videos": name, "answer": "B",
                                "problem": "Which colour? A. red B. green C. blue"}) + "\n")
    cfg = VideoDatasetConfig(mode="rl", video_root=videos, sampling=CFG, decode="lazy", **config)
    ds = LongVideoDataset.from_file(path, tokenizer=tokenizer, num_video_tokens=lambda t: 2 * t, config=cfg)
    ds.set_shard(shard)
    return ds


def test_the_dataset_shares_the_probe_through_probe_dir_or_cache_dir(videos, tokenizer, tmp_path, no_file_access):
    with pytest.raises(ValueError, match="probe_wait_s"):
        VideoDatasetConfig(video_root=videos, probe_wait_s=-1)
    folders = ({"probe_dir": str(tmp_path / "probe")}, {"cache_dir": str(tmp_path / "cache")})
    fresh = {name: probe_lazy(os.path.join(videos, name), CFG) for name in NAMES}
    for config in folders:
        leader = _dataset(videos, tokenizer, FrameShard(rank=0, size=2), **config)
        for name in NAMES:
            frames, _, _ = leader.load_frames(name)
            assert frames.num_probes == 1
        assert len(os.listdir(next(iter(config.values())))) == len(NAMES)
    no_file_access()
    for config in folders:
        follower = _dataset(videos, tokenizer, FrameShard(rank=1, size=2), **config)
        for name in NAMES:
            frames, indices, timestamps = follower.load_frames(name)
            assert frames.num_probes == 0 and list(frames.indices) == indices and frames.timestamps == timestamps
            assert frames.info == fresh[name].info and frames.size == fresh[name].size


def _rank_worker(rank, world_size, root, folder):
    shard = FrameShard(rank=rank, size=world_size)
    out = {}
    for name in NAMES:
        frames = probe_shared(os.path.join(root, name), CFG, probe_dir=folder, shard=shard, wait_s=60)
        frames.decode_shard(shard)
        out[name] = (frames.num_probes, frames.frames(*shard.frames_of(len(frames))))
    return out


def test_ranks_in_parallel_probe_once_between_them_and_decode_the_frames_of_one_probe(videos, tmp_path):
    results = run_ranks(_rank_worker, 2, videos, str(tmp_path / "probe"))
    for name in NAMES:
        full = decode_video(os.path.join(videos, name), CFG).frames
        assert torch.equal(torch.cat([r[name][1] for r in results]), full)
        assert 1 <= sum(r[name][0] for r in results) <= 2  # rank 0 probes; rank 1 too only if it gave up waiting
