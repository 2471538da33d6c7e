"""Our own plumbing around the ``vllm`` engines, with a fake ``vllm`` module (vLLM cannot run here).

These tests check what we build and send, not that vLLM accepts it: that every keyword, request key
and weight name exists in vLLM's real source is ``tests/rl/test_vllm_contract.py``'s job (it reads
vLLM 0.33.0's wheel and runs its prompt expansion and positions on our requests).

Checked here: the import error names the ``[vllm]`` extra; the ``LLM`` is built with prompt embeddings,
prefix caching, sleep mode, our worker extension and a Qwen2 folder of our shape; requests are
``EmbedsPrompt`` dicts, one per response, whose ``SamplingParams`` carry our settings and that response's seed; outputs become
``Completion``s; a weight sync streams exactly the HF ``Qwen2ForCausalLM`` tensors in bounded chunks
through ``collective_rpc`` (or the in-process driver worker), which load strictly into transformers'
Qwen2 and reproduce the VLM's language-model logits; sleep/wake reach vLLM. For Qwen2.5-VL: the folder
(config and processor files of our config), the engine arguments (embeddings in, no tower), the
tokenizer checks, the requests (one placeholder per video, our cached embeddings, grid, time step,
cache key), the errors naming what is wrong, and a sync of exactly the language model of transformers'
``Qwen2_5_VLForConditionalGeneration``; and the trainer hands such an engine the cached video tokens.
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
from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig
from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig
from megatron_longvideo.models.llava_onevision.vision import VisionConfig
from megatron_longvideo.models.llava_onevision.model import VLMConfig
from megatron_longvideo.rl.engines import SamplingConfig, build_engine
from megatron_longvideo.rl.engines.decode import response_seed
from megatron_longvideo.rl.engines.vllm_engine import WeightSyncExtension, chunk_weights
from megatron_longvideo.rl.rollout import ROLLOUT_SECONDS_PER_FRAME
from tests.dist import init_cpu_dist, run_ranks

CFG = VLMConfig(llm=LLMConfig.tiny(vocab_size=96), vision=VisionConfig(), video_token_id=3)
QWEN_CFG = Qwen25VLConfig(llm=LLMConfig.tiny(vocab_size=96, mrope_section=(2, 3, 3)), vision=QwenVisionConfig(),
                          video_token_id=3)


def write_qwen_tokenizer(folder: str, video_token_id: int, image_token: str = "<|image_pad|>") -> str:
    """A tiny Hugging Face tokenizer folder with ``<|video_pad|>`` at ``video_token_id`` (and ``image_token``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|endoftext|>", "<|im_end|>"] + [f"w{i}" for i in range(80)] + [image_token]
    words.insert(video_token_id, "<|video_pad|>")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)
    return folder


@dataclasses.dataclass
class _Logprob:
    logprob: float


@dataclasses.dataclass
class _Output:
    token_ids: list
    logprobs: list
    finish_reason: str


def _second_token(seed):
    return 8 + (seed or 0) % 7


def _finish(seed):
    return "stop" if (seed or 0) % 2 == 0 else "length"


class _FakeLLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.config = json.load(open(os.path.join(kwargs["model"], "config.json")))
        self.calls = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(("generate", prompts, params))
        outs = []
        for p in params:  # what a seeded request draws: a token of its seed
            second = _second_token(p.seed)
            comps = [_Output([7, second], [{7: _Logprob(-0.5)}, {second: _Logprob(-1.5)}], _finish(p.seed))
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
    assert kw["enable_prompt_embeds"] and kw["enable_sleep_mode"] and kw["skip_tokenizer_init"] and kw["enable_prefix_caching"]
    assert kw["load_format"] == "dummy" and kw["dtype"] == "bfloat16" and kw["seed"] == 11
    module, _, cls = kw["worker_extension_cls"].rpartition(".")
    assert getattr(importlib.import_module(module), cls) is WeightSyncExtension
    assert engine.llm.config["architectures"] == ["Qwen2ForCausalLM"]
    assert llm_config_from_hf(engine.llm.config) == CFG.llm

    prompts = [torch.randn(5, 64), torch.randn(9, 64)]
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=12, n=2, stop_token_ids=[4], seed=3, logprobs=True)
    result = engine.generate(prompts, sampling)
    _, requests, params = engine.llm.calls[-1]
    # one request per response, each with the response's own seed (a prompt's requests share its prefix)
    seeds = [[response_seed(3, i, j) for j in range(2)] for i in range(2)]
    assert [set(r) for r in requests] == [{"prompt_embeds"}] * 4
    for r, p in zip(requests, [prompts[0], prompts[0], prompts[1], prompts[1]]):
        assert r["prompt_embeds"].dtype == torch.bfloat16 and torch.equal(r["prompt_embeds"], p.to(torch.bfloat16))
    assert [p.seed for p in params] == seeds[0] + seeds[1]
    p = vars(params[0])
    assert p == dict(n=1, temperature=0.7, top_p=0.9, max_tokens=12, stop=None, stop_token_ids=[4], seed=seeds[0][0],
                     logprobs=0, detokenize=False)
    assert [[c.token_ids for c in group] for group in result] == [[(7, _second_token(s)) for s in row] for row in seeds]
    assert [[c.finish_reason for c in group] for group in result] == [[_finish(s) for s in row] for row in seeds]
    assert result[0][0].logprobs == (-0.5, -1.5)
    # given seeds: as many responses as seeds, drawn with them (how a step's responses are split over ranks)
    given = engine.generate(prompts, sampling, seeds=[[5], [6, 9, 12]])
    assert [p.seed for p in engine.llm.calls[-1][2]] == [5, 6, 9, 12]
    assert [[c.token_ids for c in group] for group in given] == [[(7, _second_token(5))], [(7, _second_token(s)) for s in (6, 9, 12)]]
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


# -- Qwen2.5-VL -----------------------------------------------------------------------------------------
def _qwen_prompt(num_frames=5, keys=("key-1",)):
    """(RLPrompt, VideoPrompt, video embeddings [N, h]) of one 56 x 56 video between text."""
    from megatron_longvideo.rl.rollout import RLPrompt, video_prompts

    frames = torch.randn(num_frames, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    n = QWEN_CFG.num_video_tokens(num_frames, 56, 56)
    ids = torch.tensor([9, 7, *[QWEN_CFG.video_token_id] * n, 8])
    prompt = RLPrompt(videos=(frames,), prompt_ids=ids, ground_truth=None, content_ids=("clip",))
    video = torch.randn(n, 64, generator=torch.Generator().manual_seed(2))  # [N, h]: the tower's output
    return prompt, video_prompts(QWEN_CFG, [prompt], [[video]], None if keys is None else [list(keys)])[0], video


def test_qwen_engine_folder_and_arguments(fake_vllm, tmp_path):
    from megatron_longvideo.models.qwen2_5_vl.model import qwen25vl_config_from_hf
    from megatron_longvideo.rl.engines.vllm_qwen import VLLMQwenEngine

    tok = write_qwen_tokenizer(str(tmp_path / "tok"), QWEN_CFG.video_token_id)
    engine = build_engine("vllm", QWEN_CFG, tokenizer=tok, seed=2)
    assert isinstance(engine, VLLMQwenEngine) and engine.takes_video_prompts
    kw = engine.llm.kwargs
    assert kw["enable_mm_embeds"] and kw["limit_mm_per_prompt"] == {"image": 0, "video": 0}  # embeddings in, no tower
    assert kw["tokenizer"] == tok and kw["skip_tokenizer_init"] is False and "enable_prompt_embeds" not in kw
    assert kw["load_format"] == "dummy" and kw["enable_prefix_caching"] and kw["enable_sleep_mode"] and kw["seed"] == 2
    assert engine.llm.config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert dataclasses.replace(qwen25vl_config_from_hf(engine.llm.config), image_token_id=None) == QWEN_CFG
    processor = json.load(open(os.path.join(kw["model"], "preprocessor_config.json")))
    assert (processor["merge_size"], processor["patch_size"], processor["temporal_patch_size"]) == (2, 14, 2)


def test_qwen_engine_requests_hold_one_placeholder_and_the_cached_video(fake_vllm, tmp_path):
    engine = build_engine("vllm", QWEN_CFG, tokenizer=write_qwen_tokenizer(str(tmp_path / "tok"), QWEN_CFG.video_token_id))
    prompt, video_prompt, video = _qwen_prompt(num_frames=5)  # an odd frame count: 3 temporal patches
    assert video_prompt.grids == ((3, 4, 4),) and video_prompt.seconds_per_grid == (1.0,)  # 2 frames 0.5 s apart
    long_ids = torch.tensor([9, *[3] * QWEN_CFG.num_video_tokens(40, 56, 56), 8])  # time outruns the 2 x 2 grid
    frames = torch.zeros(40, 3, 56, 56)
    assert torch.equal(QWEN_CFG.positions(long_ids[None], [frames])[0],  # the policy's default spacing is the same
                       QWEN_CFG.positions(long_ids[None], [frames], seconds_per_frame=[ROLLOUT_SECONDS_PER_FRAME])[0])
    [request] = engine.build_video_requests([video_prompt])
    assert request["prompt_token_ids"] == [9, 7, QWEN_CFG.video_token_id, 8]
    v = request["multi_modal_data"]["video"]
    assert v["video_embeds"].dtype == torch.bfloat16 and torch.equal(v["video_embeds"], video.to(torch.bfloat16))
    assert v["video_grid_thw"].tolist() == [[3, 4, 4]] and v["video_grid_thw"].dtype == torch.int64
    assert v["second_per_grid_ts"].tolist() == [1.0] and request["multi_modal_uuids"] == {"video": ["key-1"]}
    assert "multi_modal_uuids" not in engine.build_video_requests([_qwen_prompt(keys=None)[1]])[0]
    result = engine.generate_videos([video_prompt], SamplingConfig(n=2, seed=5, max_new_tokens=3))
    seeds = [response_seed(5, 0, j) for j in range(2)]
    assert [p.seed for p in engine.llm.calls[-1][2]] == seeds
    assert [[c.token_ids for c in g] for g in result] == [[(7, _second_token(s)) for s in seeds]]

    short = dataclasses.replace(video_prompt, prompt_ids=video_prompt.prompt_ids[:-3])
    with pytest.raises(ValueError, match=r"prompts\[0\]\.videos\[0\]: grid \(3, 4, 4\) makes 12 tokens of width 64; "
                                         r"the prompt holds 10 placeholders"):
        engine.build_video_requests([short])
    split = dataclasses.replace(video_prompt, prompt_ids=torch.cat([video_prompt.prompt_ids, torch.tensor([3])]))
    with pytest.raises(ValueError, match=r"prompts\[0\]\.prompt_ids: 2 runs of the video token 3, expected one per video"):
        engine.build_video_requests([split])
    with pytest.raises(ValueError, match=r"prompts\[0\]: expected one grid, time step \(and key\) per video"):
        engine.build_video_requests([dataclasses.replace(video_prompt, grids=())])
    with pytest.raises(NotImplementedError, match="takes VideoPrompts"):
        engine.generate([torch.randn(3, 64)], SamplingConfig())
    # long videos: vLLM's encoder cache must hold one, so max_video_tokens raises max_num_batched_tokens
    bounded = build_engine("vllm", QWEN_CFG, tokenizer=engine.tokenizer, max_video_tokens=8, max_num_batched_tokens=4)
    assert bounded.llm.kwargs["max_num_batched_tokens"] == 8
    with pytest.raises(ValueError, match=r"prompts\[0\]\.videos\[0\]: 12 video tokens, more than max_video_tokens=8"):
        bounded.build_video_requests([video_prompt])


def test_qwen_engine_refuses_what_vllm_would_get_wrong(fake_vllm, tmp_path):
    import megatron_longvideo.rl.engines.vllm_engine as vllm_engine

    good = write_qwen_tokenizer(str(tmp_path / "good"), QWEN_CFG.video_token_id)
    with pytest.raises(ValueError, match=r"text_after: vLLM resumes text after a video at the largest position \+ 1"):
        build_engine("vllm", dataclasses.replace(QWEN_CFG, text_after="spatial"), tokenizer=good)
    with pytest.raises(ValueError, match="tokenizer: vLLM's Qwen2.5-VL processor needs a Hugging Face tokenizer folder"):
        build_engine("vllm", QWEN_CFG)
    other = write_qwen_tokenizer(str(tmp_path / "other"), 5)
    with pytest.raises(ValueError, match=r"looks up the video token '<\|video_pad\|>', which this tokenizer maps to 5, "
                                         r"but the policy's video_token_id is 3"):
        build_engine("vllm", QWEN_CFG, tokenizer=other)
    no_image = write_qwen_tokenizer(str(tmp_path / "no_image"), QWEN_CFG.video_token_id, image_token="<img>")
    with pytest.raises(ValueError, match=r"looks up the image token '<\|image_pad\|>', which this tokenizer maps to None"):
        build_engine("vllm", QWEN_CFG, tokenizer=no_image)
    with pytest.raises(ValueError, match="tokenizer: vLLM loads a Hugging Face tokenizer folder by path"):
        build_engine("vllm", QWEN_CFG, tokenizer=types.SimpleNamespace(source=good))
    # the folder behind our tokenizers, for vLLM: an HF folder, not a sentencepiece file
    assert vllm_engine.tokenizer_folder(types.SimpleNamespace(source=good)) == good
    spm = tmp_path / "tok.model"
    spm.write_bytes(b"")
    assert vllm_engine.tokenizer_folder(types.SimpleNamespace(source=str(spm))) is None


def test_qwen_weight_sync_sends_exactly_the_language_model(fake_vllm, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_longvideo.models.qwen2_5_vl.hf import hf_config, megatron_items

    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(hf_config(QWEN_CFG)).eval()
    theirs = hf.state_dict()
    state = dict(megatron_items(lambda: iter(theirs.items()), QWEN_CFG))  # llm.* and vision.*: a policy's full state
    assert any(k.startswith("vision.") for k in state)
    engine = build_engine("vllm", QWEN_CFG, tokenizer=write_qwen_tokenizer(str(tmp_path / "tok"), 3), dtype="float32",
                          sync_chunk_bytes=30_000)
    engine.sync_weights(state)
    rpcs = [c for c in engine.llm.calls if c[0] == "rpc"]
    sent = dict(kv for c in rpcs for kv in c[2][0])
    language_model = {k: v for k, v in theirs.items() if not k.startswith("model.visual.")}
    assert set(sent) == set(language_model) and len(rpcs) > 3, sorted(set(sent) ^ set(language_model))[:5]
    assert all(torch.equal(sent[k], v) for k, v in language_model.items())
    assert engine.llm.calls[-1] == ("reset_prefix_cache",)


def _video_trainer_worker(rank, world_size):
    """A GRPO trainer at CP=2 whose engine (on rank 0 only) takes VideoPrompts: every rank must build them."""
    init_cpu_dist()
    from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.engines.base import Completion, RolloutEngine
    from megatron_longvideo.rl.rollout import is_replica_leader, prompt_embeddings
    from megatron_longvideo.rl.trainer import GRPOConfig, GRPOTrainer

    class Recorder(RolloutEngine):  # in the place of VLLMQwenEngine
        takes_video_prompts = True
        prompts = None

        def generate_videos(self, prompts, sampling, seeds=None):
            self.prompts = prompts
            return [[Completion(token_ids=(5, 6 + r)) for r in range(len(s))] for s in seeds]

        def generate(self, prompt_embeds, sampling, seeds=None):
            raise AssertionError("merged embeddings for an engine that takes VideoPrompts")

        def sync_weights(self, weights):
            pass

        def sleep(self, level=1):
            pass

        def wake(self):
            pass

    groups = initialize_parallel(ParallelConfig(context_parallel_size=world_size))
    torch.manual_seed(0)
    model = build_qwen25vl(QWEN_CFG, groups)
    engine = Recorder() if is_replica_leader(groups) else None
    trainer = GRPOTrainer(GRPOConfig(group_size=2, prompts_per_step=1), policy=model, optimizer=None, groups=groups,
                          tokenizer=types.SimpleNamespace(pad_id=0, eos_id=2), engine=engine)
    prompt, _, _ = _qwen_prompt(num_frames=4)
    responses = trainer.generate([prompt])
    out = {"responses": responses, "cached": len(trainer.cache) == 1}
    with torch.no_grad():  # the video rows of the merged prompt the hf engine would get (collective: every rank)
        merged = prompt_embeddings(model, groups, [prompt])[0]
    if engine is not None:
        [sent] = engine.prompts
        rows = merged[prompt.prompt_ids == QWEN_CFG.video_token_id]
        out.update(ids=torch.equal(sent.prompt_ids, prompt.prompt_ids), grids=sent.grids, keys=sent.keys,
                   key=trainer._keys([prompt], model)[0][0], same_video=torch.equal(sent.videos[0].cpu(), rows.cpu()))
    destroy_parallel()
    return out


def test_trainer_hands_a_video_prompt_engine_the_cached_video_on_every_rank():
    leader, other = run_ranks(_video_trainer_worker, 2, timeout=120)
    assert leader["responses"] == other["responses"] == [[[5, 6], [5, 7]]]
    assert leader["cached"] and other["cached"], "the video was not encoded (and cached) on every rank"
    assert leader["ids"] and leader["same_video"] and leader["grids"] == ((2, 4, 4),)
    assert leader["keys"] == (leader["key"],)


def test_memory_share_is_what_is_free_beside_training():
    from megatron_longvideo.rl.engines.vllm_engine import memory_utilization

    gib = 2**30
    # 80 GB GPU, 50 free, 10 still to be allocated by the optimizer, 5% margin: (50 - 10) / 80 - 0.05
    assert memory_utilization(50 * gib, 80 * gib, reserve_bytes=10 * gib) == round(40 / 80 - 0.05, 4)
    assert memory_utilization(80 * gib, 80 * gib) == 0.95  # never all of it
    with pytest.raises(ValueError, match=r"4\.0 GiB of 80\.0 GiB are free, and 2\.0 GiB are reserved"):
        memory_utilization(4 * gib, 80 * gib, reserve_bytes=2 * gib)
    with pytest.raises(ValueError, match="total GPU memory"):
        memory_utilization(1, 0)


def test_engine_outside_a_job_has_no_launcher_and_takes_the_given_share(fake_vllm):
    engine = build_engine("vllm", CFG, gpu_memory_utilization=0.3)
    assert "distributed_executor_backend" not in engine.llm.kwargs and engine.llm.kwargs["gpu_memory_utilization"] == 0.3
