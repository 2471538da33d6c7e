"""The ``hf`` rollout engine against our own Megatron model (TP=2, 2 gloo ranks).

The policy is a tiny VLM with TP-sharded LLM weights; its merged video+text prompt embeddings for
two prompts of different lengths (so the batch is left-padded) go to ``HFEngine`` after
``sync_weights(gather_full_state(...))``. Greedy decoding must reproduce the Megatron model's own
argmax next tokens when the generated tokens are fed back, and the returned log-probs must equal
Megatron's log-softmax. Sampling is reproducible for a seed; a stop token ends a response; a
level-2 sleep drops the weights until the next sync.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import init_cpu_dist, run_ranks

VOCAB = 128
VIDEO_ID = 3
NEW = 6


def _megatron_next_tokens(model, groups, prompt, tokens):
    """Argmax and log-softmax of our model over the response positions of prompt + tokens."""
    from megatron_longvideo.checkpoint.full_state import _all_gather_cat
    from megatron_longvideo.models.llm import lm_forward
    from megatron_longvideo.models.vlm import text_embeddings

    seq = torch.cat([prompt, text_embeddings(model, torch.tensor([tokens[:-1]]))[0]])  # [L + T - 1, h]
    positions = torch.arange(seq.shape[0])[None]
    logits = lm_forward(model.llm, decoder_input=seq[:, None, :].contiguous(), position_ids=positions)  # [1, s, V / tp]
    logits = _all_gather_cat(logits, -1, groups.tp)[0, prompt.shape[0] - 1 :]  # [T, V]
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    return logits.argmax(-1).tolist(), logprobs


def _worker(rank, world_size):
    from megatron_longvideo.checkpoint.full_state import gather_full_state
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.models.vlm import vlm_forward
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.engines import SamplingConfig, build_engine

    init_cpu_dist()
    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=2))
    torch.manual_seed(0)
    cfg = VLMConfig(llm=LLMConfig.tiny(vocab_size=VOCAB), video_token_id=VIDEO_ID)
    model = build_vlm(cfg, groups)
    g = torch.Generator().manual_seed(1)
    prompts = []
    with torch.no_grad():
        for frames, text in ((2, 5), (1, 11)):
            n = cfg.vision.num_video_tokens(frames)
            ids = torch.randint(4, VOCAB, (1, n + text), generator=g)
            ids[0, 1 : 1 + n] = VIDEO_ID
            video = torch.randn(frames, 3, 32, 32, generator=g)
            _, merged = vlm_forward(model, groups, input_ids=ids, videos=[[video]], return_merged=True)
            prompts.append(merged.embeds[0])  # [L_i, h]: 14 and 16 tokens
        engine = build_engine("hf", cfg)
        engine.sync_weights(gather_full_state(model, groups))
        out = {"lengths": [p.shape[0] for p in prompts]}
        greedy = engine.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=NEW, logprobs=True))
        out["greedy"] = [c[0].token_ids for c in greedy]
        out["argmax"], out["logprob_diff"] = [], 0.0
        for prompt, group in zip(prompts, greedy):
            argmax, logprobs = _megatron_next_tokens(model, groups, prompt, list(group[0].token_ids))
            out["argmax"].append(tuple(argmax))
            out["logprob_diff"] = max(out["logprob_diff"], (logprobs - torch.tensor(group[0].logprobs)).abs().max().item())
        sample = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=NEW, n=3, seed=5)
        first, again = engine.generate(prompts, sample), engine.generate(prompts, sample)
        other = engine.generate(prompts, SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=NEW, n=3, seed=6))
        out["n_shape"] = [len(gr) for gr in first]
        out["same_seed_equal"] = first == again
        out["other_seed_differs"] = first != other
        stop_id = out["greedy"][0][2]
        stopped = engine.generate(prompts[:1], SamplingConfig(temperature=0, max_new_tokens=NEW, stop_token_ids=[stop_id]))
        out["stopped"] = (stopped[0][0].token_ids, stopped[0][0].finish_reason, stop_id)
        engine.sleep(level=2)
        try:
            engine.generate(prompts, SamplingConfig(temperature=0))
            out["asleep_error"] = None
        except RuntimeError as e:
            out["asleep_error"] = str(e)
        engine.wake()
        engine.sync_weights(gather_full_state(model, groups))
        out["after_wake"] = [c[0].token_ids for c in engine.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=NEW))]
    destroy_parallel()
    return out


def test_hf_engine_greedy_matches_megatron_argmax_at_tp2():
    out = run_ranks(_worker, 2)[0]
    assert out["lengths"] == [14, 16]
    assert [len(t) for t in out["greedy"]] == [NEW, NEW]
    assert out["greedy"] == out["argmax"], f"HF greedy {out['greedy']} != Megatron argmax {out['argmax']}"
    assert out["logprob_diff"] < 1e-4, out["logprob_diff"]
    assert out["n_shape"] == [3, 3]
    assert out["same_seed_equal"] and out["other_seed_differs"]
    tokens, reason, stop_id = out["stopped"]
    assert reason == "stop" and tokens[-1] == stop_id and len(tokens) == out["greedy"][0].index(stop_id) + 1
    assert out["asleep_error"] and "asleep" in out["asleep_error"]
    assert out["after_wake"] == out["greedy"]


def test_hf_engine_sync_errors_and_tied_embeddings():
    from transformers import Qwen2ForCausalLM

    from megatron_longvideo.checkpoint.hf_config import qwen2_config
    from megatron_longvideo.checkpoint.hf_map import CheckpointMismatchError, WeightMap
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.rl.engines import SamplingConfig
    from megatron_longvideo.rl.engines.hf_engine import HFEngine

    cfg = LLMConfig.tiny(vocab_size=VOCAB, tie_word_embeddings=True)
    torch.manual_seed(2)
    source = Qwen2ForCausalLM(qwen2_config(cfg)).eval()
    state = dict(WeightMap(cfg).to_megatron(source.state_dict()))
    engine = HFEngine(cfg)
    with pytest.raises(RuntimeError, match="sync_weights"):
        engine.generate([torch.randn(3, 64)], SamplingConfig())
    partial = {k: v for k, v in state.items() if "layers.1." not in k}
    with pytest.raises(CheckpointMismatchError, match=r"lacks .*decoder\.layers\.1\."):
        engine.sync_weights(partial)
    engine.sync_weights(state)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.equal(engine.model(input_ids=ids).logits, source(input_ids=ids).logits)
