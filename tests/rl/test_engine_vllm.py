"""The ``vllm`` engine around vLLM itself, with a fake ``vllm`` module (vLLM cannot run here).

Checked: the import error names the ``[vllm]`` extra; the ``LLM`` is built with prompt embeddings,
sleep mode, our worker extension and a Qwen2 folder of our shape; requests are ``EmbedsPrompt``
dicts and ``SamplingParams`` carry our settings (seed + prompt index); outputs become
``Completion``s; a weight sync streams exactly the HF ``Qwen2ForCausalLM`` tensors in bounded chunks
through ``collective_rpc`` (or the in-process driver worker), which load strictly into transformers'
Qwen2 and reproduce the VLM's language-model logits; sleep/wake reach vLLM.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import types

import pytest
import torch

from megatron_longvideo.checkpoint.hf_config import hf_config, llm_config_from_hf
from megatron_longvideo.checkpoint.hf_map import WeightMap
from megatron_longvideo.models.llm import LLMConfig
from megatron_longvideo.models.vision import VisionConfig
from megatron_longvideo.models.vlm import VLMConfig
from megatron_longvideo.rl.engines import SamplingConfig, build_engine
from megatron_longvideo.rl.engines.vllm_engine import WeightSyncExtension, chunk_weights

CFG = VLMConfig(llm=LLMConfig.tiny(vocab_size=96), vision=VisionConfig(), video_token_id=3)


@dataclasses.dataclass
class _Logprob:
    logprob: float


@dataclasses.dataclass
class _Output:
    token_ids: list
    logprobs: list
    finish_reason: str


class _FakeLLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.config = json.load(open(os.path.join(kwargs["model"], "config.json")))
        self.calls = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(("generate", prompts, params))
        outs = []
        for p in params:
            comps = [_Output([7, 8 + r], [{7: _Logprob(-0.5)}, {8 + r: _Logprob(-1.5)}], "stop" if r == 0 else "length")
                     for r in range(p.n)]
            outs.append(types.SimpleNamespace(outputs=comps))
        return outs

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append(("rpc", method, args))
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up",))


class _SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = _FakeLLM, _SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def _vlm_full_state():
    """A VLM full state made from a transformers LLaVA-OneVision (and that model, for logits)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(hf_config(CFG)).eval()
    state = dict(WeightMap(CFG).to_megatron(model.state_dict()))
    return state, model


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"\[vllm\] extra"):
        build_engine("vllm", CFG)


def test_engine_construction_and_requests(fake_vllm):
    engine = build_engine("vllm", CFG, seed=11, tensor_parallel_size=1)
    kw = engine.llm.kwargs
    assert kw["enable_prompt_embeds"] and kw["enable_sleep_mode"] and kw["skip_tokenizer_init"]
    assert kw["load_format"] == "dummy" and kw["dtype"] == "bfloat16" and kw["seed"] == 11
    module, _, cls = kw["worker_extension_cls"].rpartition(".")
    assert getattr(importlib.import_module(module), cls) is WeightSyncExtension
    assert engine.llm.config["architectures"] == ["Qwen2ForCausalLM"]
    assert llm_config_from_hf(engine.llm.config) == CFG.llm

    prompts = [torch.randn(5, 64), torch.randn(9, 64)]
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=12, n=2, stop_token_ids=[4], seed=3, logprobs=True)
    result = engine.generate(prompts, sampling)
    _, requests, params = engine.llm.calls[-1]
    assert [set(r) for r in requests] == [{"prompt_embeds"}] * 2
    for r, p in zip(requests, prompts):
        assert r["prompt_embeds"].dtype == torch.bfloat16 and torch.equal(r["prompt_embeds"], p.to(torch.bfloat16))
    assert [p.seed for p in params] == [3, 4]
    p = vars(params[0])
    assert p == dict(n=2, temperature=0.7, top_p=0.9, max_tokens=12, stop=None, stop_token_ids=[4], seed=3,
                     logprobs=0, detokenize=False)
    assert [[c.token_ids for c in group] for group in result] == [[(7, 8), (7, 9)]] * 2
    assert result[0][0].logprobs == (-0.5, -1.5) and result[0][0].finish_reason == "stop" and result[0][1].finish_reason == "length"
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.generate(prompts, SamplingConfig(stop=["</answer>"]))
    with pytest.raises(ValueError, match=r"prompt_embeds\[1\]: expected a tensor \[L, 64\]"):
        engine.generate([torch.randn(3, 64), torch.randn(3, 32)], SamplingConfig())
    engine.sleep(level=2)
    engine.wake()
    assert engine.llm.calls[-2:] == [("sleep", 2), ("wake_up",)]
    with pytest.raises(ValueError, match="level"):
        engine.sleep(level=3)


def test_weight_sync_streams_qwen2_tensors_in_chunks(fake_vllm):
    from transformers import Qwen2ForCausalLM

    state, llava = _vlm_full_state()
    engine = build_engine("vllm", CFG, dtype="float32", sync_chunk_bytes=40_000)
    engine.sync_weights(iter(state.items()))  # a VLM state: its vision tensors are not sent
    rpcs = [c for c in engine.llm.calls if c[0] == "rpc"]
    assert engine.llm.calls[-1] == ("reset_prefix_cache",)
    assert {c[1] for c in rpcs} == {"mlv_load_weights"} and len(rpcs) > 3
    chunks = [c[2][0] for c in rpcs]
    for chunk in chunks:
        size = sum(t.numel() * t.element_size() for _, t in chunk)
        assert size <= 40_000 or len(chunk) == 1, size
    sent = dict(kv for chunk in chunks for kv in chunk)
    qwen = Qwen2ForCausalLM(hf_config(CFG.llm)).eval()
    assert set(sent) == set(qwen.state_dict())
    qwen.load_state_dict(sent, strict=True)
    ids = torch.randint(4, 96, (2, 10))
    with torch.no_grad():
        assert torch.allclose(qwen(input_ids=ids).logits, llava(input_ids=ids).logits, atol=1e-6)

    # a worker receiving a chunk runs the model's own loader
    loaded = []
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=types.SimpleNamespace(
        load_weights=lambda weights: loaded.extend(weights))))
    assert WeightSyncExtension.mlv_load_weights(worker, chunks[0]) == len(chunks[0])
    assert [n for n, _ in loaded] == [n for n, _ in chunks[0]]


def test_weight_sync_without_collective_rpc_uses_the_driver_worker(fake_vllm):
    state, _ = _vlm_full_state()
    engine = build_engine("vllm", CFG)
    loaded = []
    inner = types.SimpleNamespace(load_weights=lambda weights: loaded.extend(weights))
    old = types.SimpleNamespace(llm_engine=types.SimpleNamespace(model_executor=types.SimpleNamespace(
        driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=inner)))))
    engine.llm = old
    engine.sync_weights(state)
    assert {n for n, _ in loaded} == set(WeightMap.language_model(CFG).hf_names)
    assert all(t.dtype == torch.bfloat16 for _, t in loaded)


def test_chunks_hold_at_most_the_bound():
    items = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5, 5])]  # float32: 4 bytes each
    assert [[n for n, _ in c] for c in chunk_weights(iter(items), 80)] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
