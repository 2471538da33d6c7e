"""MR-SP stage 1 for audio: windows encoded in parallel over the encode group equal world=1.

A Qwen2-Audio with short windows (32 mel frames -> 8 tokens) and a batch of two samples: 5 windows
(the last with 20 real frames: 4 x 8 + 5 = 37 tokens) and 3 windows (the last with 7: 2 x 8 + 2 = 18), window
counts that the group sizes 2 and 4 do not divide, so ranks encode blank padding windows. The whole
model runs (tower, projector, merge, Qwen2 LLM with CP / TP / SP). Merged embeddings, loss and every
gradient (tower and projector included, each replica of the tower holding the same one) equal world=1
within 1e-5 relative, the key slice of every fused q/k/v bias (transformers' ``k_proj`` has none) keeps a
zero gradient, and a second no-grad encode of the same audios through a
:class:`~megatron_longvideo.models.video_cache.VideoEmbeddingCache` is served from it (2 hits) with the
world=1 tokens.
"""

from __future__ import annotations

import torch

from tests.dist import init_cpu_dist, run_ranks

VOCAB = 128
AUDIO_ID = 3
SEQ = 64
TOL = 1e-5
AUDIO = dict(num_mel_bins=8, hidden_size=16, num_layers=2, num_attention_heads=2, ffn_hidden_size=32, max_source_positions=16)


def _cfg():
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.qwen2_audio.audio import AudioConfig
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig

    return Qwen2AudioConfig(llm=LLMConfig.tiny(vocab_size=VOCAB), audio=AudioConfig(**AUDIO), audio_token_id=AUDIO_ID)


def _batch():
    from megatron_longvideo.models.qwen2_audio.audio import pack_windows

    cfg = _cfg()
    g = torch.Generator().manual_seed(3)
    frames = cfg.audio.window_frames
    audios, counts = [], []
    for windows, last in ((5, 20), (3, 7)):
        features = torch.randn(windows, cfg.audio.num_mel_bins, frames, generator=g)
        audios.append(pack_windows(features, [frames] * (windows - 1) + [last]))
        counts.append(cfg.num_audio_tokens((windows - 1) * frames + last))
    assert counts == [37, 18], counts
    ids = torch.randint(4, VOCAB, (2, SEQ + 1), generator=g)
    mask = torch.ones(2, SEQ)
    for i, (n, s) in enumerate(zip(counts, (2, 9))):
        ids[i, s : s + n] = AUDIO_ID
        mask[i, s - 1 : s + n] = 0  # no loss on predicting audio tokens
    mask[1, -6:] = 0
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask, "audios": [[audios[0]], [audios[1]]]}


def _run(layout, full_weights, batch, encode_group="tp_cp"):
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.full_state import gather_full_state, load_full_state
    from megatron_longvideo.models.encode import encode_videos
    from megatron_longvideo.models.qwen2_audio.model import build_qwen2_audio, qwen2_audio_forward
    from megatron_longvideo.models.video_cache import VideoEmbeddingCache
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.training.engine import OptimConfig, build_optimizer, forward_backward, wrap_ddp
    from megatron_longvideo.training.lm_step import cp_shard

    config = ParallelConfig(tensor_parallel_size=layout.get("tp", 1), context_parallel_size=layout.get("cp", 1),
                            sequence_parallel=layout.get("sp", False), encode_group=encode_group)
    groups = initialize_parallel(config, seed=11)
    torch.manual_seed(11)
    model = build_qwen2_audio(_cfg(), groups)
    if full_weights is not None:
        load_full_state(model, full_weights, groups)
    weights = gather_full_state(model, groups)
    ddp = wrap_ddp(model, groups)
    merged_out = {}

    def step(mb, chunk):
        out, merged = qwen2_audio_forward(chunk, groups, input_ids=mb["input_ids"], audios=mb["audios"], labels=mb["labels"],
                                          return_merged=True)
        merged_out["embeds"] = merged.embeds.detach().clone()
        mask = cp_shard(mb["loss_mask"], groups)

        def loss_func(losses):
            total = (losses.float() * mask).sum()
            count = mask.sum().to(torch.int)
            return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}

        return out, loss_func

    ddp.zero_grad_buffer()
    reports = forward_backward(ddp, step, [batch], seq_length=SEQ, micro_batch_size=2)
    totals = sum(r["lm loss"] for r in reports)
    dist.all_reduce(totals, group=groups.dp_cp)
    grads = gather_full_state(ddp, groups, what="grad")
    tower_grad = torch.cat([g.reshape(-1) for k, g in sorted(grads.items()) if k.startswith("vision.")])
    everyone = [torch.empty_like(tower_grad) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, tower_grad)
    spread = max((e - tower_grad).abs().max() for e in everyone).item()
    _, grad_norm, _ = build_optimizer([ddp], OptimConfig(lr=0.0, clip_grad=1e9)).step()
    cache = VideoEmbeddingCache()
    audios = [a for sample in batch["audios"] for a in sample]
    with torch.no_grad():
        first = encode_videos(model.vision, audios, groups, cache=cache, keys=["a", "b"])
        again = encode_videos(model.vision, audios, groups, cache=cache, keys=["a", "b"])
    cached = {"hits": cache.stats.hits, "same": all(torch.equal(x, y) for x, y in zip(first, again)),
              "tokens": [t.detach().cpu().clone() for t in first]}
    key_bias = model.vision._key_bias.cpu()
    destroy_parallel()
    return {"loss": (totals[0] / totals[1]).item(), "grads": grads, "weights": weights, "merged": merged_out["embeds"],
            "replica_spread": spread, "grad_norm": float(grad_norm), "cache": cached, "key_bias": key_bias}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _worker(rank, world_size, layouts):
    init_cpu_dist()
    batch = _batch()
    ref = _run({}, None, batch)
    out = {}
    for name, (layout, encode_group) in layouts.items():
        got = _run(layout, ref["weights"], batch, encode_group)
        out[name] = {
            "loss": abs(got["loss"] - ref["loss"]) / abs(ref["loss"]),
            "merged": _rel(got["merged"], ref["merged"]),
            "grad": max(_rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"] if ref["grads"][k].abs().max() > 0),
            "tower_grad": max(_rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"]
                              if k.startswith("vision.") and ref["grads"][k].abs().max() > 0),
            "replica_spread": got["replica_spread"],
            "grad_norm": abs(got["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"],
            "cached_tokens": max(_rel(a, b) for a, b in zip(got["cache"]["tokens"], ref["cache"]["tokens"])),
        }
        out[name]["cache_ok"] = got["cache"]["hits"] == 2 and got["cache"]["same"]
    zero = [k for k, g in ref["grads"].items() if g.abs().max() == 0 and not k.endswith("position_embeddings")]
    key_grads = [g[ref["key_bias"]].abs().max().item() for k, g in ref["grads"].items()
                 if k.startswith("vision.") and k.endswith("linear_qkv.bias")]
    return {"results": out, "zero_grads": zero, "key_bias_grads": key_grads,
            "num_tower": sum(k.startswith("vision.") for k in ref["grads"]),
            "token_counts": [t.shape[0] for t in ref["cache"]["tokens"]]}


def _check(result):
    assert result["zero_grads"] == [], f"reference gradients that are zero (vacuous): {result['zero_grads']}"
    assert result["num_tower"] > 20 and result["token_counts"] == [37, 18], result
    key_grads = result["key_bias_grads"]
    assert len(key_grads) == AUDIO["num_layers"] and max(key_grads) == 0.0, key_grads
    for name, r in result["results"].items():
        assert r.pop("cache_ok"), f"{name}: the second encode was not served from the cache"
    bad = {n: r for n, r in result["results"].items() if max(r.values()) > TOL}
    assert not bad, f"differs from world=1 beyond {TOL}: {bad}"


def test_audio_encode_group_of_two_equals_world1():
    layouts = {"cp2": ({"cp": 2}, "tp_cp"), "tp2": ({"tp": 2}, "tp_cp"), "tp2_sp": ({"tp": 2, "sp": True}, "tp_cp")}
    _check(run_ranks(_worker, 2, layouts)[0])


def test_audio_encode_group_of_four_equals_world1():
    layouts = {"tp2_cp2": ({"tp": 2, "cp": 2}, "tp_cp"), "cp4": ({"cp": 4}, "tp_cp"),
               "tp2_cp2_encode_cp_only": ({"tp": 2, "cp": 2}, "cp")}
    _check(run_ranks(_worker, 4, layouts)[0])
