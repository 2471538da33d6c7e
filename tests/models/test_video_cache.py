"""The video embedding cache: encode once per step, zero times in a later epoch, never stale."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_longvideo.models.video_cache import (
    VideoEmbeddingCache,
    cache_key,
    content_id_of_file,
    content_id_of_frames,
)
from tests.dist import init_cpu_dist, run_ranks

G = 8  # rollouts per prompt


# ---------------------------------------------------------------------------------------------- #
# the cache alone
# ---------------------------------------------------------------------------------------------- #
def test_lru_is_bounded_in_bytes_and_counts():
    entry = torch.zeros(10, 4)  # 160 bytes
    cache = VideoEmbeddingCache(max_bytes=400)
    for k in "abc":
        cache.put(k, entry)
    assert len(cache) == 2 and cache.nbytes == 320 and cache.stats.evictions == 1
    assert cache.get("a") is None  # evicted: least recently used
    assert cache.get("b") is not None
    cache.put("d", entry)  # evicts c (b was used more recently)
    assert cache.get("c") is None and cache.get("b") is not None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (2, 2, 2)
    assert cache.stats.hit_rate == 0.5


def test_persistent_tier_survives_a_new_cache_and_writes_atomically(tmp_path):
    first = VideoEmbeddingCache(max_bytes=1 << 20, persist_dir=str(tmp_path))
    value = torch.randn(6, 3)
    first.put("k", value)
    assert first.stats.writes == 1
    assert os.listdir(tmp_path) == ["k.safetensors"]  # no temporary file left behind
    second = VideoEmbeddingCache(max_bytes=1 << 20, persist_dir=str(tmp_path))
    assert torch.equal(second.get("k"), value) and second.stats.disk_hits == 1
    assert torch.equal(second.get("k"), value) and second.stats.hits == 1  # now in memory


def test_failed_write_leaves_no_entry(tmp_path, monkeypatch):
    import safetensors.torch

    cache = VideoEmbeddingCache(persist_dir=str(tmp_path))

    def broken(tensors, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        cache.put("k", torch.ones(2))
    assert os.listdir(tmp_path) == []
    assert not VideoEmbeddingCache(persist_dir=str(tmp_path)).contains("k")


def test_keys_bind_content_sampling_and_weights(tmp_path):
    frames = torch.rand(4, 3, 8, 8)
    path = tmp_path / "v.bin"
    path.write_bytes(b"abc" * 1000)
    cid = content_id_of_frames(frames)
    assert cid == content_id_of_frames(frames.clone())
    assert cid != content_id_of_frames(frames + 1e-3)
    assert content_id_of_file(str(path)) == content_id_of_file(str(path))
    base = cache_key(cid, {"num_frames": 4}, "w1")
    assert base == cache_key(cid, {"num_frames": 4}, "w1")
    assert base != cache_key(cid, {"num_frames": 8}, "w1")
    assert base != cache_key(cid, {"num_frames": 4}, "w2")


# ---------------------------------------------------------------------------------------------- #
# with the model: a GRPO-shaped step, a second epoch, a weight update
# ---------------------------------------------------------------------------------------------- #
def _count_frames(encoder):
    """Frames the tower encodes (SigLIP: per frame; Qwen2.5-VL: two per temporal patch)."""
    counter = {"frames": 0}
    if hasattr(encoder, "encode_units"):
        encode_units = encoder.encode_units

        def counting_units(units):
            counter["frames"] += units.shape[0] * encoder.cfg.temporal_patch_size
            return encode_units(units)

        encoder.encode_units = counting_units
        return counter
    vit_forward = encoder.vit.forward

    def counting(x, *args, **kwargs):
        counter["frames"] += x.shape[0]
        return vit_forward(x, *args, **kwargs)

    encoder.vit.forward = counting
    return counter


def _family(name):
    """(config, builder, forward, video tokens, frame size, a tower weight, newline tokens, frames) of a tiny
    model (Qwen2.5-VL: 8 frames, 4 temporal patches that split evenly over 2 ranks, so no blank unit pads)."""
    from megatron_longvideo.models.llm import LLMConfig

    if name == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig, build_qwen25vl, qwen_vlm_forward
        from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

        cfg = Qwen25VLConfig(llm=LLMConfig(vocab_size=128, mrope_section=(2, 3, 3)), vision=QwenVisionConfig(freeze=True))
        return (cfg, build_qwen25vl, qwen_vlm_forward, cfg.num_video_tokens(8, 28, 28), 28,
                lambda m: m.vision.patch_embed.weight, 0, 8)
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.models.vlm import vlm_forward

    cfg = VLMConfig(llm=LLMConfig.tiny(vocab_size=128), vision=VisionConfig(freeze=True, freeze_projector=True))
    return cfg, build_vlm, vlm_forward, cfg.vision.num_video_tokens(6), 32, lambda m: m.vision.vit.conv1.weight, 1, 6


def _grpo_shaped_worker(rank, world_size, persist_dir, family="llava_onevision"):
    init_cpu_dist()
    from megatron_longvideo.models.video_cache import weights_version
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig(context_parallel_size=world_size))
    torch.manual_seed(0)
    cfg, build, forward, n, size, tower_weight, newline, num_frames = _family(family)
    policy = build(cfg, groups)
    reference = build(cfg, groups)  # same frozen tower weights (same seed)
    frames = torch.rand(num_frames, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = torch.full((1, 32 * ((n + 40) // 32 + 1)), 7)
    ids[0, 4 : 4 + n] = cfg.video_token_id
    sampling = {"num_frames": num_frames, "size": size}

    def key(model):
        return [[cache_key(content_id_of_frames(frames), sampling, weights_version(model.vision))]]

    def run(cache, model, grad=False):
        with torch.set_grad_enabled(grad):
            out = forward(model, groups, input_ids=ids, videos=[[frames]], labels=ids, cache=cache, cache_keys=key(model))
        if grad:
            out.sum().backward()
        return out

    counters = [_count_frames(policy.vision), _count_frames(reference.vision)]
    epoch1 = VideoEmbeddingCache(persist_dir=persist_dir)
    for _ in range(G):  # rollouts: prefill of each of the G rollouts
        run(epoch1, policy)
    run(epoch1, policy)  # old-policy log-probs
    run(epoch1, reference)  # reference log-probs
    run(epoch1, policy, grad=True)  # update
    first = sum(c["frames"] for c in counters)

    epoch2 = VideoEmbeddingCache(persist_dir=persist_dir)  # a new process's memory, same disk
    for _ in range(G + 2):
        run(epoch2, policy)
    run(epoch2, policy, grad=True)
    second = sum(c["frames"] for c in counters) - first

    # a weight update of the tower: the cached entry must not be served for the new weights
    stale_key = key(policy)[0][0]
    before = epoch2.get(stale_key).clone()
    with torch.no_grad():
        tower_weight(policy).add_(0.05)
    fresh = VideoEmbeddingCache()  # reference encoding with the new weights, no cache involved
    from megatron_longvideo.models.encode import encode_videos

    run(epoch2, policy)
    third = sum(c["frames"] for c in counters) - first - second
    new_key = key(policy)[0][0]
    served = epoch2.get(new_key)
    with torch.no_grad():
        expected = encode_videos(policy.vision, [frames], groups)[0]
        expected = expected[: expected.shape[0] - newline]
    destroy_parallel()
    return {
        "first": first, "second": second, "third": third, "hit_rate": epoch1.stats.hit_rate,
        "keys_differ": new_key != stale_key, "served_is_new": torch.equal(served, expected),
        "old_differs": not torch.allclose(before, expected), "fresh_len": len(fresh), "frames": num_frames,
    }


@pytest.mark.parametrize("world_size,family", [(1, "llava_onevision"), (2, "llava_onevision"), (2, "qwen2_5_vl")])
def test_vision_runs_once_per_frame_per_step_and_never_stale(tmp_path, world_size, family):
    results = run_ranks(_grpo_shaped_worker, world_size, str(tmp_path / "cache"), family)
    frames = results[0]["frames"]
    # summed over the encode group: each frame encoded exactly once in the step, on one rank
    assert sum(r["first"] for r in results) == frames
    assert all(r["second"] == 0 for r in results), "the persistent cache should serve the second epoch"
    assert sum(r["third"] for r in results) == frames, "a weight update must re-encode"
    for r in results:
        assert r["hit_rate"] == pytest.approx(10 / 11)  # one miss, then G + 2 hits
        assert r["keys_differ"] and r["served_is_new"] and r["old_differs"]


def _errors_worker(rank, world_size):
    init_cpu_dist()
    from megatron_longvideo.models.encode import encode_videos
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.models.vlm import vlm_forward
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig())
    cfg = VLMConfig(llm=LLMConfig.tiny(vocab_size=128), vision=VisionConfig(max_frames=4))
    model = build_vlm(cfg, groups)
    messages = {}

    def catch(name, fn):
        try:
            fn()
        except ValueError as e:
            messages[name] = str(e)

    catch("shape", lambda: encode_videos(model.vision, [torch.rand(2, 3, 16, 16)], groups))
    catch("too_long", lambda: encode_videos(model.vision, [torch.rand(5, 3, 32, 32)], groups))
    ids = torch.full((1, 16), 7)
    ids[0, 2:5] = cfg.video_token_id  # 3 placeholders, the video needs 2 x 4 + 1 = 9
    catch("placeholders", lambda: vlm_forward(model, groups, input_ids=ids, videos=[[torch.rand(2, 3, 32, 32)]]))
    destroy_parallel()
    return messages


def test_clear_errors_for_bad_video_inputs():
    messages = run_ranks(_errors_worker, 1)[0]
    assert "video 0: expected a float tensor [num_frames, 3, 32, 32], got shape (2, 3, 16, 16)" in messages["shape"]
    assert "video 0 has 5 frames, more than max_frames=4" in messages["too_long"]
    assert "sample 0: the text has 3 video placeholder tokens" in messages["placeholders"]
    assert "give 9 embeddings" in messages["placeholders"]


def test_host_tier_keeps_what_the_device_tier_evicts_and_serves_it_back():
    from megatron_longvideo.models.video_cache import VideoEmbeddingCache

    a, b, c = (torch.full((4, 8), float(i)) for i in range(3))  # 128 bytes each
    cache = VideoEmbeddingCache(max_bytes=256, host_bytes=256)
    for key, t in (("a", a), ("b", b), ("c", c)):
        cache.put(key, t)
    # the device tier holds b and c; a was evicted to the host tier, not dropped
    assert cache.nbytes == 256 and cache.host_nbytes == 128 and cache.stats.evictions == 1
    got = cache.get("a")
    assert torch.equal(got, a) and cache.stats.host_hits == 1 and cache.stats.misses == 0
    # a is back in the device tier; b (least recent) moved to the host tier in its place
    assert cache.host_nbytes == 128 and cache.contains("b") and len(cache) == 3
    # beyond both budgets the oldest host entry is dropped (counted), and then it is a miss
    cache.put("d", torch.zeros(4, 8))
    cache.put("e", torch.zeros(4, 8))
    assert cache.stats.host_evictions >= 1 and cache.get("b") is None and cache.stats.misses == 1
    cache.clear()
    assert len(cache) == 0 and cache.host_nbytes == 0
    # without a host tier, evicted entries are simply gone (the previous behaviour)
    plain = VideoEmbeddingCache(max_bytes=128)
    plain.put("a", a)
    plain.put("b", b)
    assert plain.get("a") is None and plain.stats.host_hits == 0
