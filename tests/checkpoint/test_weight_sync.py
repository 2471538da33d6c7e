"""Bucketed weight sync: ``iter_full_state_buckets`` / ``iter_full_state_items`` at TP=2 (2 gloo ranks).

One spawn checks, for a tiny VLM in fp32 and in bf16: the buckets hold exactly ``gather_full_state``'s
keys, in its order, with bit-equal values in the parameters' own dtype (bf16 stays bf16; ``dtype``
casts); no bucket is over the bound unless it is one tensor; replicated parameters are handed out as
the parameters themselves (no copy). Then the trainer's pattern: rank 0 syncs an ``HFEngine`` from the
stream while rank 1 only drains it, and every engine parameter equals the weight map of the gathered
state; rank 1 syncs a ``VLLMEngine`` (vLLM faked: our chunking only) whose chunks stay bounded and are
sent before the stream is exhausted. Without processes: an engine writes weights as they come (an
aborted stream has already written its first tensors), bucket ranges, and the argument errors.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from tests.dist import init_cpu_dist, run_ranks

BUCKETS = (12_000, 100_000)  # bytes: a tiny-VLM LLM layer's fc1 is 64 kB in fp32, its norms 256 B
BUCKET, CHUNK = 12_000, 12_000


def _drain(it) -> int:
    return sum(1 for _ in it)


def _check_buckets(model, groups, ref: dict, bucket_bytes: int, **kwargs) -> dict:
    """Compare the buckets with ``ref`` (gather_full_state); return what the driver asserts."""
    from megatron_longvideo.checkpoint.full_state import iter_full_state_buckets

    params = dict(model.named_parameters())  # PP=1, local spec: local names are the full-state keys
    keys, equal, own_dtype, llm_dtypes, sizes, views = [], True, True, set(), [], 0
    for bucket in iter_full_state_buckets(model, groups, bucket_bytes=bucket_bytes, **kwargs):
        sizes.append((len(bucket), sum(t.numel() * t.element_size() for _, t in bucket)))
        for key, t in bucket:
            p = params[key]
            keys.append(key)
            equal &= t.shape == ref[key].shape and torch.equal(t.float(), ref[key])
            own_dtype &= t.dtype == kwargs.get("dtype", p.dtype)  # (the tower keeps some fp32 parameters)
            if key.startswith("llm."):
                llm_dtypes.add(t.dtype)
            # a replicated, same-dtype parameter is handed out as it is
            views += not getattr(p, "tensor_model_parallel", False) and t.data_ptr() == p.data_ptr()
    return {"keys": keys == list(ref), "equal": equal, "own_dtype": own_dtype, "dtypes": llm_dtypes, "sizes": sizes,
            "views": views}


def _fake_vllm():
    class LLM:
        def __init__(self, **kwargs):
            self.chunks = []

        def collective_rpc(self, method, args=(), kwargs=None):
            self.chunks.append((PULLED[0], args[0]))
            return [None]

        def reset_prefix_cache(self):
            pass

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, dict
    return module


PULLED = [0]


def _counted(it):
    for item in it:
        PULLED[0] += 1
        yield item


def _worker(rank, world_size):
    from megatron_longvideo.checkpoint.full_state import gather_full_state, iter_full_state_items
    from megatron_longvideo.checkpoint.hf_map import WeightMap
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.engines.hf_engine import HFEngine

    init_cpu_dist()
    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=2))
    cfg = VLMConfig(llm=LLMConfig.tiny(vocab_size=128), video_token_id=3)
    llm_only = lambda n: not n.startswith("vision.")  # noqa: E731
    out = {}
    for label, params_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = build_vlm(cfg, groups, params_dtype=params_dtype)
        ref = gather_full_state(model, groups)  # fp32 clones
        out[label] = {b: _check_buckets(model, groups, ref, b) for b in BUCKETS}
        if label == "bf16":
            out["bf16_as_fp32"] = _check_buckets(model, groups, ref, BUCKET, dtype=torch.float32)
        # the trainer's pattern: the engine's rank consumes the stream, the other TP ranks drain it
        items = iter_full_state_items(model, groups, bucket_bytes=BUCKET, select=llm_only)
        if rank == 0:
            engine = HFEngine(cfg, dtype=params_dtype)
            engine.sync_weights(items)
            want = dict(WeightMap.language_model(cfg).to_hf({k: v for k, v in ref.items() if llm_only(k)}))
            got = dict(engine.model.named_parameters())
            out[f"{label}_engine"] = (set(got) == set(want)
                                      and all(torch.equal(got[n], want[n].to(params_dtype)) for n in want))
        else:
            out[f"{label}_drained"] = _drain(items)
    # a vLLM sync from the stream on rank 1 (our chunking; vLLM faked), rank 0 drains
    items = _counted(iter_full_state_items(model, groups, bucket_bytes=BUCKET, select=llm_only))
    if rank == 1:
        from megatron_longvideo.rl.engines.vllm_engine import VLLMEngine

        sys.modules["vllm"] = _fake_vllm()
        engine = VLLMEngine(cfg, dtype="bfloat16", sync_chunk_bytes=CHUNK)
        engine.sync_weights(items)
        chunks = engine.llm.chunks
        out["vllm"] = {"pulled_at_first_chunk": chunks[0][0], "pulled": PULLED[0],
                       "sizes": [(len(c), sum(t.numel() * t.element_size() for _, t in c)) for _, c in chunks],
                       "names": sorted(n for _, c in chunks for n, _ in c),
                       "expected": sorted(WeightMap.language_model(cfg).hf_names),
                       "bf16": all(t.dtype == torch.bfloat16 for _, c in chunks for _, t in c)}
    else:
        _drain(items)
    destroy_parallel()
    return out


def test_buckets_equal_the_full_gather_and_engines_sync_from_the_stream_at_tp2():
    outs = run_ranks(_worker, 2)
    for out in outs:
        for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for bucket_bytes, r in out[label].items():
                assert r["keys"] and r["equal"] and r["own_dtype"], (label, bucket_bytes, r)
                assert r["dtypes"] == {dtype}, (label, r["dtypes"])
                sizes = r["sizes"]
                assert len(sizes) > 2 and all(size <= bucket_bytes or n == 1 for n, size in sizes), sizes
                assert any(n > 1 for n, _ in sizes), sizes
                assert r["views"] > 5, r["views"]  # norms and the replicated tower: not copied
            assert any(size > BUCKET for _, size in out[label][BUCKET]["sizes"])  # a bigger tensor goes alone
        r = out["bf16_as_fp32"]
        assert r["keys"] and r["equal"] and r["own_dtype"] and r["dtypes"] == {torch.float32}, r
    assert outs[0]["fp32_engine"] and outs[0]["bf16_engine"]
    assert outs[1]["fp32_drained"] == outs[1]["bf16_drained"] > 0
    v = outs[1]["vllm"]
    assert v["names"] == v["expected"] and v["bf16"]
    assert all(size <= CHUNK or n == 1 for n, size in v["sizes"]), v["sizes"]
    assert len(v["sizes"]) > 5 and v["pulled_at_first_chunk"] < v["pulled"] / 2, v


def test_an_engine_writes_weights_as_they_come():
    """An HFEngine does not gather the stream into a dict: a stream that fails halfway has already
    written its first tensors."""
    from transformers import Qwen2ForCausalLM

    from megatron_longvideo.checkpoint.hf_config import qwen2_config
    from megatron_longvideo.checkpoint.hf_map import WeightMap
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.rl.engines.hf_engine import HFEngine

    cfg = LLMConfig.tiny(vocab_size=128)
    torch.manual_seed(3)
    state = list(WeightMap(cfg).to_megatron(Qwen2ForCausalLM(qwen2_config(cfg)).state_dict()))
    first_key, first = state[0]
    assert first_key == "embedding.word_embeddings.weight"

    def stream():
        yield from state[: len(state) // 2]
        raise RuntimeError("stream cut")

    engine = HFEngine(cfg)
    with pytest.raises(RuntimeError, match="stream cut"):
        engine.sync_weights(stream())
    assert torch.equal(engine.model.model.embed_tokens.weight, first)


def test_bucket_ranges_and_argument_errors():
    from megatron_longvideo.checkpoint.full_state import _bucket_ranges, iter_full_state_buckets

    assert _bucket_ranges([10, 10, 30, 5, 5, 5], 20) == [range(0, 2), range(2, 3), range(3, 6)]
    assert _bucket_ranges([30, 1], 20) == [range(0, 1), range(1, 2)]
    assert _bucket_ranges([], 20) == []
    model = torch.nn.Linear(2, 2)
    one_stage = types.SimpleNamespace(size=lambda group: 1, pp=None, tp=None)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="bucket_bytes"):
            iter_full_state_buckets(model, one_stage, bucket_bytes=bad)
    two_stages = types.SimpleNamespace(size=lambda group: 2, pp=object(), tp=None)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2.*gather_full_state"):
        iter_full_state_buckets(model, two_stages, bucket_bytes=1000)
