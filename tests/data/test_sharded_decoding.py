"""Frame-sharded decoding and prefetch: each rank of the encode group decodes only the frames it encodes,
a cached video is not decoded, a slice that fails is agreed on by the group (no hang), and prefetching
workers hand out what synchronous drawing would.

The encodings are compared with world=1 on real files (PyAV-decoded H.264 and VP9); the failing slice is a
real file too: an MP4 with its index in front, cut after 60 % of its bytes, whose header still declares
every frame, so the probe passes and only the slice past the cut fails to decode.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
from megatron_longvideo.data.errors import VideoDecodeError
from megatron_longvideo.data.frames import FrameShard, LazyFrames, as_tensor, frame_shard
from megatron_longvideo.data.sampler import DistributedVideoSampler
from megatron_longvideo.data.sampling import FrameSamplingConfig
from megatron_longvideo.data.synthetic import write_synthetic_video
from megatron_longvideo.data.video import decode_video, probe_lazy
from tests.dist import init_cpu_dist, run_ranks

CFG = FrameSamplingConfig(num_frames=10, image_size=32)


def _write_cut_faststart_mp4(path: str, num_frames: int = 40) -> None:
    """An MP4 with its index in front (``faststart``), cut after 60 % of its bytes."""
    import av

    full = path + ".full.mp4"
    rng = np.random.default_rng(0)
    with av.open(full, "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("h264", rate=8)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for _ in range(num_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), format="rgb24")
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    data = open(full, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) * 6 // 10])
    os.remove(full)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    write_synthetic_video(str(root / "a.mp4"), num_frames=120, size=48, seed=1)
    write_synthetic_video(str(root / "b.webm"), num_frames=50, size=40, codec="vp9", seed=2)
    write_synthetic_video(str(root / "c.mp4"), num_frames=30, size=32, seed=3)
    _write_cut_faststart_mp4(str(root / "cut.mp4"))
    return str(root)


@pytest.mark.parametrize("num_frames,size,unit", [(10, 3, 1), (7, 2, 1), (3, 4, 1), (11, 3, 2), (1, 2, 2), (8, 4, 2)])
def test_frame_shard_covers_every_frame_once(num_frames, size, unit):
    covered = []
    for rank in range(size):
        per_rank, start, stop = frame_shard(num_frames, size, rank, unit)
        assert (start % unit == 0 or start == stop == num_frames) and 0 <= start <= stop <= num_frames
        assert stop - start <= per_rank * unit
        covered += range(start, stop)
    assert covered == list(range(num_frames))
    assert per_rank * size * unit >= num_frames


@pytest.mark.parametrize("name", ["a.mp4", "b.webm"])
def test_lazy_frames_equal_decode_video_and_decode_only_what_is_asked(videos, name):
    path = os.path.join(videos, name)
    full = decode_video(path, CFG)
    pieces = []
    for rank in range(3):
        lazy = probe_lazy(path, CFG)  # a fresh object per rank: nothing decoded yet
        assert lazy.shape == full.frames.shape and lazy.num_decoded == 0
        assert list(lazy.indices) == full.indices and lazy.timestamps == full.timestamps
        start, stop = FrameShard(rank=rank, size=3).frames_of(len(lazy))
        lazy.decode_shard(FrameShard(rank=rank, size=3))
        assert lazy.num_decoded == stop - start and lazy.decoded_positions() == list(range(start, stop))
        assert len(lazy._store.blocks) == 1  # one tensor per request: a worker shares it through one descriptor
        pieces.append(lazy.frames(start, stop))
        assert lazy.num_decoded == stop - start  # asking again decodes nothing
    assert torch.equal(torch.cat(pieces), full.frames)

    lazy = probe_lazy(path, CFG)
    view = lazy[[0, 4, 9]]  # as --rollout-max-frames takes a subset
    assert view.shape[0] == 3 and torch.equal(as_tensor(view), full.frames[[0, 4, 9]])
    assert lazy.decoded_positions() == [0, 4, 9]  # the view decoded into the video's own store
    again = pickle.loads(pickle.dumps(lazy))  # as a DataLoader worker sends it
    assert again.decoded_positions() == [0, 4, 9] and again.num_decoded == 3
    assert torch.equal(again.frames(4, 5), full.frames[4:5]) and again.num_decoded == 3
    assert torch.equal(again[4], full.frames[4]) and torch.equal(again[-1], full.frames[-1])  # an int: a frame


def test_a_slice_past_the_cut_fails_with_the_file_named(videos):
    path = os.path.join(videos, "cut.mp4")
    lazy = probe_lazy(path, CFG)  # the probe passes: the header declares 40 frames
    lazy.decode_shard(FrameShard(rank=0, size=2))
    with pytest.raises(VideoDecodeError, match="cut.mp4: cannot decode video: truncated or corrupt"):
        lazy.decode_shard(FrameShard(rank=1, size=2))


def _records(folder, names) -> str:
    """Writes the records file and returns its path. Ranks that share the folder write it at once, so each writes
    a file of its own and renames it into place: no rank reads a file another has just truncated."""
    path = os.path.join(folder, f"qa_{'_'.join(n.split('.')[0] for n in names)}.jsonl")
    own = f"{path}.{os.getpid()}"
    with open(own, "w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"problem_id": f"p{i}-{name}", "videos": name, "answer": "B",
                                "problem": "Which colour? A. red B. green C. blue"}) + "\n")
    os.replace(own, path)
    return path


def _dataset(videos, names, tokenizer, **config):
    cfg = VideoDatasetConfig(mode="rl", video_root=videos, sampling=CFG, **config)
    return LongVideoDataset.from_file(_records(videos, names), tokenizer=tokenizer, num_video_tokens=lambda t: 2 * t,
                                      config=cfg)


def test_lazy_dataset_decodes_its_shard_in_getitem(videos, tokenizer):
    full = _dataset(videos, ["a.mp4", "b.webm"], tokenizer)
    lazy = _dataset(videos, ["a.mp4", "b.webm"], tokenizer, decode="lazy")
    assert isinstance(lazy[0]["videos"][0], LazyFrames) and lazy[0]["videos"][0].num_decoded == 0
    lazy.shard = FrameShard(rank=1, size=2)
    for i in range(2):
        sample, reference = lazy[i], full[i]
        assert sample["videos"][0].decoded_positions() == list(range(5, 10)) and sample["shard_error"] is None
        assert torch.equal(sample["videos"][0].materialize(), reference["videos"][0])
        assert torch.equal(sample["input_ids"], reference["input_ids"])
    cut = _dataset(videos, ["cut.mp4"], tokenizer, decode="lazy")
    cut.shard = FrameShard(rank=1, size=2)
    sample = cut[0]  # not this rank's to skip: the error travels with the sample
    assert sample["index"] == 0 and "truncated or corrupt" in sample["shard_error"][1]
    assert "record 'p0-cut.mp4'" in sample["shard_error"][1]


def _tower(family, groups):
    torch.manual_seed(5)
    if family == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig, build_qwen_vision_tower

        vcfg = QwenVisionConfig(window_size=56)
        return build_qwen_vision_tower(vcfg, groups, seed=5), vcfg, 2 * vcfg.patch_size * vcfg.spatial_merge_size
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig
    from megatron_longvideo.models.llm import LLMConfig

    vcfg = VisionConfig()
    return build_vlm(VLMConfig(llm=LLMConfig.tiny(vocab_size=64), vision=vcfg), groups).vision, vcfg, vcfg.image_size


NAMES = ("a.mp4", "b.webm", "c.mp4")


def _encode_worker(rank, world_size, root, family, weights):
    init_cpu_dist()
    from megatron_longvideo.models.encode import encode_shard, encode_videos
    from megatron_longvideo.models.video_cache import VideoEmbeddingCache
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig(context_parallel_size=world_size), seed=5)
    tower, vcfg, size = _tower(family, groups)
    sampling = FrameSamplingConfig(num_frames=9, image_size=size)
    paths = [os.path.join(root, n) for n in NAMES]
    out = {}
    with torch.no_grad():
        if weights is None:  # world=1 on fully decoded tensors: the reference and its weights
            out["reference"] = encode_videos(tower, [decode_video(p, sampling).frames for p in paths], groups)
            out["weights"] = {k: v.clone() for k, v in tower.state_dict().items() if torch.is_tensor(v)}
        else:
            missing, unexpected = tower.load_state_dict(weights, strict=False)
            assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
            lazy = [probe_lazy(p, sampling) for p in paths]
            out["got"] = encode_videos(tower, lazy, groups)
            shard = encode_shard(groups, vcfg)
            out["decoded"] = [v.decoded_positions() for v in lazy]
            out["expected_positions"] = [list(range(*shard.frames_of(len(v)))) for v in lazy]
            # the embedding cache: a fresh, undecoded copy of each video is served without decoding a frame
            cache, keys = VideoEmbeddingCache(), [f"k{i}" for i in range(3)]
            encode_videos(tower, lazy, groups, cache=cache, keys=keys)
            fresh = [probe_lazy(p, sampling) for p in paths]
            cached = encode_videos(tower, fresh, groups, cache=cache, keys=keys)
            out["fresh_decoded"] = [v.num_decoded for v in fresh]
            out["cached_equal"] = all(torch.equal(a, b) for a, b in zip(out["got"], cached))
    destroy_parallel()
    return out


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_sharded_encoding_equals_world1_and_decodes_each_frame_once(videos, family):
    single = run_ranks(_encode_worker, 1, videos, family, None)[0]
    results = run_ranks(_encode_worker, 2, videos, family, single["weights"])
    for r in results:
        assert r["decoded"] == r["expected_positions"], "a rank decoded frames it does not encode"
        for got, want in zip(r["got"], single["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert r["fresh_decoded"] == [0, 0, 0], "a cached video must not be decoded"
        assert r["cached_equal"]
    for v in range(3):  # together the two ranks decoded every sampled frame exactly once
        assert sorted(results[0]["decoded"][v] + results[1]["decoded"][v]) == list(range(9))


def _failing_worker(rank, world_size, root):
    init_cpu_dist()
    from megatron_longvideo.models.encode import encode_videos
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig(context_parallel_size=world_size), seed=5)
    tower = build_vlm(VLMConfig(llm=LLMConfig.tiny(vocab_size=64), vision=VisionConfig()), groups).vision
    sampling = FrameSamplingConfig(num_frames=10, image_size=VisionConfig().image_size)
    try:
        with torch.no_grad():
            encode_videos(tower, [probe_lazy(os.path.join(root, "cut.mp4"), sampling)], groups)
        message = None
    except VideoDecodeError as e:
        message = str(e)
    destroy_parallel()
    return message


def test_a_failed_slice_raises_the_same_error_on_every_rank(videos):
    messages = run_ranks(_failing_worker, 2, videos)
    assert messages[0] is not None and messages[0] == messages[1]
    assert "cut.mp4: cannot decode video: truncated or corrupt" in messages[0] and "on rank 1 of the group" in messages[0]


def _stream(videos, names, tokenizer, *, workers=0, shard=None, group=None, on_error="skip", seed=3):
    from megatron_longvideo.rl.prompt_stream import PromptStream

    ds = _dataset(videos, names, tokenizer, decode="lazy", on_error=on_error)
    sampler = DistributedVideoSampler(len(ds), dp_rank=0, dp_size=1, seed=seed)
    return PromptStream(ds, sampler, prefetch_workers=workers, shard=shard, group=group)


def _drawn(stream, steps, k):
    return [[(p.sample_id, p.content_ids, as_tensor(p.videos[0])) for p in stream.draw(k)] for _ in range(steps)]


def _same(a, b):
    return len(a) == len(b) and all(
        len(x) == len(y) and all(p[:2] == q[:2] and torch.equal(p[2], q[2]) for p, q in zip(x, y)) for x, y in zip(a, b))


def test_prefetching_workers_hand_out_what_drawing_in_place_does(videos, tokenizer):
    names = ["a.mp4", "b.webm", "c.mp4"]
    reference = _drawn(_stream(videos, names, tokenizer), 4, 2)  # 8 prompts: across two epochs
    stream = _stream(videos, names, tokenizer, workers=2, shard=FrameShard(rank=0, size=2))
    head = _drawn(stream, 2, 2)
    state = stream.state_dict()
    assert _same(head + _drawn(stream, 2, 2), reference)
    stream.close()
    resumed = _stream(videos, names, tokenizer, workers=2, shard=FrameShard(rank=0, size=2))
    resumed.load_state_dict(state)
    assert _same(head + _drawn(resumed, 2, 2), reference)
    resumed.close()
    # the slice came decoded from the worker: only this rank's frames
    first = _stream(videos, names, tokenizer, workers=1, shard=FrameShard(rank=0, size=2)).draw(1)[0]
    assert first.videos[0].decoded_positions() == list(range(5))


def test_a_workers_error_reaches_the_caller_naming_the_file(videos, tokenizer, tmp_path):
    (tmp_path / "text.mp4").write_bytes(b"not a video\n" * 20)
    os.symlink(os.path.join(videos, "a.mp4"), tmp_path / "a.mp4")
    stream = _stream(str(tmp_path), ["text.mp4", "a.mp4"], tokenizer, workers=1, on_error="raise")
    with pytest.raises(VideoDecodeError, match=r"text.mp4: cannot decode video: not a readable video container"):
        stream.draw(2)
    stream.close()


def _stream_worker(rank, world_size, root, on_error):
    init_cpu_dist()
    import torch.distributed as dist

    from megatron_longvideo.data.tokenizer import load_tokenizer

    stream = _stream(root, ["c.mp4", "cut.mp4", "a.mp4", "b.webm"], load_tokenizer("bytes"),
                     shard=FrameShard(rank=rank, size=world_size), group=dist.group.WORLD, on_error=on_error)
    try:
        drawn = [p.sample_id for p in stream.draw(3)]
    except VideoDecodeError as e:
        return {"error": str(e)}
    return {"drawn": drawn, "skips": stream.skip_report.counts(), "bad": sorted(stream.skip_report.bad_videos)}


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_ranks_agree_on_a_failed_slice_when_drawing(videos, on_error):
    results = run_ranks(_stream_worker, 2, videos, on_error)
    if on_error == "raise":
        assert results[0]["error"] == results[1]["error"] and "cut.mp4" in results[0]["error"]
        return
    assert results[0]["drawn"] == results[1]["drawn"] and len(results[0]["drawn"]) == 3
    assert not any("cut" in d for d in results[0]["drawn"])
    for r in results:  # rank 0 decoded its half of cut.mp4 fine, and still skipped it with rank 1
        assert r["bad"] == [os.path.join(videos, "cut.mp4")]
        assert r["skips"] == {"video: truncated or corrupt": 1}


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_the_loader_skips_a_batch_whose_slice_failed(videos, tokenizer, on_error):
    from megatron_longvideo.data.loader import ResumableDataLoader

    ds = _dataset(videos, ["c.mp4", "cut.mp4", "a.mp4"], tokenizer, decode="lazy", on_error=on_error)
    sampler = DistributedVideoSampler(len(ds), dp_rank=0, dp_size=1, shuffle=False)
    loader = ResumableDataLoader(ds, sampler, num_workers=1, shard=FrameShard(rank=1, size=2))
    if on_error == "raise":
        with pytest.raises(VideoDecodeError, match="cut.mp4: cannot decode video: truncated or corrupt"):
            list(loader)
        return
    batches = list(loader)
    assert [b["sample_id"] for b in batches] == [["p0-c.mp4"], ["p2-a.mp4"]]
    assert loader.skip_report.counts() == {"video: truncated or corrupt": 1}
    assert batches[0]["videos"][0][0].decoded_positions() == list(range(5, 10))  # decoded in the worker
    with pytest.raises(ValueError, match="decode='lazy'"):
        ResumableDataLoader(_dataset(videos, ["c.mp4"], tokenizer), sampler, shard=FrameShard(rank=0, size=2))
