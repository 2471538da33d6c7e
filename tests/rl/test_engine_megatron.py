"""The ``megatron`` rollout engine (generation on the policy itself) against the ``hf`` engines, TP=2 on 2 gloo ranks.

One spawn, two families. LLaVA-OneVision (plain RoPE, TP=2, the policy DDP-wrapped): merged video+text
prompts of 14 and 16 tokens; greedy tokens equal ``HFEngine``'s (synced from ``gather_full_state``),
log-probs within 1e-4, seeded top-p samples equal exactly, also when the responses are drawn as given
per-response seeds in two calls; a stop token ends a response; ``sync_weights`` reads nothing; sleep
levels and a dtype other than the policy's are refused. Qwen2.5-VL (multimodal RoPE, tied embeddings, TP=2 with sequence parallelism):
prompts with videos of 1 and 2 temporal patches at the positions the policy computes, so decoding
continues past the largest position, not at L; the same checks against ``MultimodalRoPEEngine``, and
the log-probs of the generated tokens against the policy's own training forward (``lm_forward`` under
SP, teacher-forced). Every TP rank returns the same completions, unseeded sampling included. Norm
weights and Q/K/V biases are perturbed (built as ones and zeros) so their layout is exercised.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.dist import init_cpu_dist, run_ranks

NEW = 6


def _perturb(model, groups):
    """Non-trivial norms and biases: a TP shard gets noise of its own, a replicated tensor the same on every rank."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("llm.") and ("norm" in name or name.endswith("bias")):
                sharded = getattr(p, "tensor_model_parallel", False)
                seed = zlib.crc32(f"{name}:{groups.rank(groups.tp) if sharded else 0}".encode())
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).to(p.dtype) * 0.2)


def _max_diff(a, b):
    return max(abs(x - y) for ga, gb in zip(a, b) for ca, cb in zip(ga, gb) for x, y in zip(ca.logprobs, cb.logprobs))


def _compare(ours, ref, prompts, positions=None):
    """The checks both families share: our engine against the reference engine on the same prompts."""
    from megatron_longvideo.rl.engines import SamplingConfig
    from megatron_longvideo.rl.engines.decode import response_seed

    kw = {} if positions is None else {"positions": positions}
    out = {}
    greedy = SamplingConfig(temperature=0, max_new_tokens=NEW, logprobs=True)
    mine, theirs = ours.generate(prompts, greedy, **kw), ref.generate(prompts, greedy, **kw)
    out["greedy"], out["ref_greedy"] = [g[0].token_ids for g in mine], [g[0].token_ids for g in theirs]
    out["greedy_diff"] = _max_diff(mine, theirs)
    sample = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=NEW, n=3, seed=5, logprobs=True)
    mine_s, theirs_s = ours.generate(prompts, sample, **kw), ref.generate(prompts, sample, **kw)
    out["sampled"] = [[c.token_ids for c in g] for g in mine_s]
    out["ref_sampled"] = [[c.token_ids for c in g] for g in theirs_s]
    out["sampled_diff"] = _max_diff(mine_s, theirs_s)
    # the same responses drawn as per-response seeds, split over two calls (as ranks divide a step)
    seeds = [[response_seed(5, i, j) for j in range(3)] for i in range(len(prompts))]
    first = ours.generate(prompts, sample, seeds=[s[:1] for s in seeds], **kw)
    rest = ours.generate(prompts, sample, seeds=[s[1:] for s in seeds], **kw)
    out["split"] = [[c.token_ids for c in a + b] for a, b in zip(first, rest)]
    stop_id = out["greedy"][0][2]
    stop = SamplingConfig(temperature=0, max_new_tokens=NEW, stop_token_ids=[stop_id])
    one = {} if positions is None else {"positions": positions[:1]}
    out["stopped"] = ours.generate(prompts[:1], stop, **one)[0][0]
    out["ref_stopped"] = ref.generate(prompts[:1], stop, **one)[0][0]
    out["stop_id"] = stop_id
    unseeded = ours.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=NEW, n=2), **kw)
    out["unseeded"] = [[c.token_ids for c in g] for g in unseeded]  # equal on every TP rank
    return out


def _llava(groups):
    from megatron_longvideo.checkpoint.full_state import gather_full_state
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.models.vlm import vlm_forward
    from megatron_longvideo.rl.engines import SamplingConfig, build_engine
    from megatron_longvideo.training.engine import wrap_ddp

    vocab, video_id = 128, 3
    torch.manual_seed(0)
    cfg = VLMConfig(llm=LLMConfig.tiny(vocab_size=vocab, init_std=0.1), video_token_id=video_id)
    model = build_vlm(cfg, groups)
    _perturb(model, groups)
    g = torch.Generator().manual_seed(1)
    prompts = []
    with torch.no_grad():
        for frames, text in ((2, 5), (1, 11)):
            n = cfg.vision.num_video_tokens(frames)
            ids = torch.randint(4, vocab, (1, n + text), generator=g)
            ids[0, 1 : 1 + n] = video_id
            _, merged = vlm_forward(model, groups, input_ids=ids, videos=[[torch.randn(frames, 3, 32, 32, generator=g)]],
                                    return_merged=True)
            prompts.append(merged.embeds[0])  # [L_i, h]: 14 and 16 tokens
    ref = build_engine("hf", cfg)
    ref.sync_weights(gather_full_state(model, groups))
    ours = build_engine("megatron", cfg, policy=wrap_ddp(model, groups), groups=groups)
    out = {"lengths": [p.shape[0] for p in prompts], **_compare(ours, ref, prompts)}
    weights = iter([("llm.embedding.word_embeddings.weight", torch.zeros(1))])
    ours.sync_weights(weights)
    out["sync_consumed_nothing"] = next(weights, None) is not None
    out["flags"] = (ours.needs_weight_sync, ours.shards_over_tp, ours.takes_video_prompts)
    errors = []
    for call in (lambda: ours.generate(prompts, SamplingConfig(), positions=[torch.zeros(3, 14), torch.zeros(3, 16)]),
                 lambda: ours.sleep(level=3),
                 lambda: build_engine("megatron", cfg, policy=model, groups=groups, dtype=torch.bfloat16)):
        with pytest.raises(ValueError) as err:
            call()
        errors.append(str(err.value))
    ours.sleep(level=2)
    with pytest.raises(RuntimeError, match="asleep"):
        ours.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=NEW))
    ours.wake()
    out["after_wake"] = [c[0].token_ids for c in ours.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=NEW))]
    out["errors"] = errors
    return out


def _qwen(groups):
    from megatron_longvideo.checkpoint.full_state import _all_gather_cat, gather_full_state
    from megatron_longvideo.models.llm import LLMConfig, lm_forward
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig, build_qwen25vl
    from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig
    from megatron_longvideo.models.vlm import text_embeddings
    from megatron_longvideo.rl.engines import SamplingConfig, build_engine
    from megatron.core import tensor_parallel

    vocab, video_id = 304, 3
    torch.manual_seed(0)
    cfg = Qwen25VLConfig(llm=LLMConfig(vocab_size=vocab, init_std=0.1, mrope_section=(2, 3, 3), tie_word_embeddings=True),
                         vision=QwenVisionConfig(window_size=56, freeze=True), video_token_id=video_id)
    model = build_qwen25vl(cfg, groups)
    _perturb(model, groups)
    g = torch.Generator().manual_seed(2)
    prompts, positions = [], []
    with torch.no_grad():
        for frames, text in ((2, 5), (4, 8)):  # 1 and 2 temporal patches of 2 x 2 merged tokens
            n = cfg.num_video_tokens(frames, 56, 56)
            ids = torch.cat([torch.tensor([7]), torch.full((n,), video_id), torch.randint(10, vocab, (text,), generator=g)])
            embeds = text_embeddings(model, ids[None])[0]
            embeds[1 : 1 + n] = torch.randn(n, cfg.llm.hidden_size, generator=g) * 0.05  # stand-ins for the tower's tokens
            prompts.append(embeds)
            positions.append(cfg.positions(ids[None], [torch.zeros(frames, 3, 56, 56)])[0][:, 0])  # [3, L]
    ref = build_engine("hf", cfg)
    ref.sync_weights(gather_full_state(model, groups))
    ours = build_engine("megatron", cfg, policy=model, groups=groups)
    out = {"lengths": [p.shape[0] for p in prompts], "next_positions": [int(p.max()) + 1 for p in positions],
           **_compare(ours, ref, prompts, positions)}
    # teacher-forced through the training forward (sequence parallel): the log-probs of the greedy tokens
    diff = 0.0
    with torch.no_grad():
        greedy = ours.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=NEW, logprobs=True), positions=positions)
        for prompt, pos, group in zip(prompts, positions, greedy):
            tokens = list(group[0].token_ids)
            seq = torch.cat([prompt, text_embeddings(model, torch.tensor([tokens[:-1]]))[0]])  # [L + T - 1, h]
            first = int(pos.max()) + 1
            full_pos = torch.cat([pos, (first + torch.arange(len(tokens) - 1))[None].expand(3, -1)], dim=1)  # [3, S]
            if seq.shape[0] % 2:  # SP splits the sequence over TP: pad at the end (causal, never attended)
                seq = torch.cat([seq, seq.new_zeros(1, seq.shape[1])])
                full_pos = torch.cat([full_pos, full_pos[:, -1:] + 1], dim=1)
            decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(seq[:, None].contiguous(), group=groups.tp)
            logits = lm_forward(model.llm, decoder_input=decoder_input, position_ids=full_pos[:, None])  # [1, S, V / tp]
            logits = _all_gather_cat(logits, -1, groups.tp)[0, prompt.shape[0] - 1 : prompt.shape[0] - 1 + len(tokens)]
            logprobs = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
            diff = max(diff, (logprobs - torch.tensor(group[0].logprobs)).abs().max().item())
    out["training_forward_diff"] = diff
    return out


def _worker(rank, world_size):
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    init_cpu_dist()
    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=2))
    llava = _llava(groups)
    destroy_parallel()
    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=2, sequence_parallel=True))
    qwen = _qwen(groups)
    destroy_parallel()
    return {"llava": llava, "qwen": qwen}


def _check_family(out):
    assert [len(t) for t in out["greedy"]] == [NEW, NEW]
    assert out["greedy"] == out["ref_greedy"], (out["greedy"], out["ref_greedy"])
    assert out["greedy_diff"] < 1e-4, out["greedy_diff"]
    assert [len(g) for g in out["sampled"]] == [3, 3]
    assert out["sampled"] == out["ref_sampled"], (out["sampled"], out["ref_sampled"])
    assert out["sampled_diff"] < 1e-4, out["sampled_diff"]
    assert out["split"] == out["sampled"]
    stopped, ref, stop_id = out["stopped"], out["ref_stopped"], out["stop_id"]
    assert stopped == ref and stopped.finish_reason == "stop" and stopped.token_ids[-1] == stop_id
    assert len(stopped.token_ids) == out["greedy"][0].index(stop_id) + 1


def test_megatron_engine_matches_hf_engines_at_tp2():
    ranks = run_ranks(_worker, 2)
    for key in ("llava", "qwen"):  # every TP rank: the same completions (unseeded ones too)
        for field in ("greedy", "sampled", "unseeded", "stopped"):
            assert ranks[0][key][field] == ranks[1][key][field], (key, field)
    llava, qwen = ranks[0]["llava"], ranks[0]["qwen"]
    assert llava["lengths"] == [14, 16]
    _check_family(llava)
    assert llava["sync_consumed_nothing"] and llava["flags"] == (False, True, False)
    assert "plain-RoPE" in llava["errors"][0] and "level" in llava["errors"][1] and "policy's dtype" in llava["errors"][2]
    assert llava["after_wake"] == llava["greedy"]
    assert qwen["next_positions"][1] != qwen["lengths"][1]  # decoding continues past the largest position, not at L
    _check_family(qwen)
    assert qwen["training_forward_diff"] < 1e-4, qwen["training_forward_diff"]


def test_megatron_engine_refuses_pipeline_parallelism_and_is_registered():
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.parallel.groups import ParallelConfig, ParallelGroups
    from megatron_longvideo.rl.engines import ENGINES, build_engine

    assert "megatron" in ENGINES
    groups = ParallelGroups(config=ParallelConfig(pipeline_parallel_size=2), tp=None, pp=None, cp=None, dp=None,
                            dp_cp=None, tp_cp=None, encode=None)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2"):
        build_engine("megatron", LLMConfig.tiny(), policy=None, groups=groups)
