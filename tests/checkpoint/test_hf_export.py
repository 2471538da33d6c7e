"""Hugging Face export and import across layouts, checked against transformers itself.

Tiny HF models (``LlavaOnevisionForConditionalGeneration`` with an odd 5 x 5 patch grid, so bilinear
pooling differs from 2x2 averaging, and a tied ``Qwen2ForCausalLM``) are made by transformers and
saved. On 2 gloo ranks each layout (TP=1, TP=2, PP=2) imports them (``load_hf_into_model``), runs
our model on the same text and video, and exports it again (``export_model``, several shards).
Then transformers loads each export with its own classes: no missing or unexpected keys, the same
logits within 1e-4 relative, and every tensor equal to the original file (an exact round trip
HF -> Megatron layout -> HF).
"""

from __future__ import annotations

import os

import torch

from tests.dist import init_cpu_dist, run_ranks

VOCAB = 128
VIDEO_ID = 3
FRAMES = 3
TOL = 1e-4
LAYOUTS = {"tp1": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}}


def _cfgs():
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig

    vlm = VLMConfig(llm=LLMConfig.tiny(vocab_size=VOCAB), vision=VisionConfig(image_size=40, patch_size=8), video_token_id=VIDEO_ID)
    return {"vlm": vlm, "llm": LLMConfig.tiny(vocab_size=VOCAB, tie_word_embeddings=True, rotary_base=5e5)}


def _batch():
    """Two samples of one 3-frame video each, at different places: ids [2, S], frames [2, T, 3, 40, 40]."""
    n = _cfgs()["vlm"].vision.num_video_tokens(FRAMES)  # 3 x ceil(5/2)^2 + 1 = 28
    g = torch.Generator().manual_seed(5)
    frames = torch.randn(2, FRAMES, 3, 40, 40, generator=g)
    ids = torch.randint(4, VOCAB, (2, n + 12), generator=g)
    ids[0, 2 : 2 + n] = VIDEO_ID
    ids[1, 9 : 9 + n] = VIDEO_ID
    return ids, frames


def _megatron_logits(model, groups, kind, ids, frames):
    from megatron_longvideo.checkpoint.full_state import _all_gather_cat
    from megatron_longvideo.models.llm import lm_forward
    from megatron_longvideo.models.vlm import vlm_forward
    from megatron_longvideo.training.engine import forward_backward, wrap_ddp

    ddp = wrap_ddp(model, groups)
    positions = torch.arange(ids.shape[1]).expand_as(ids)

    def step(batch, chunk):
        if kind == "vlm":
            out = vlm_forward(chunk, groups, input_ids=batch["ids"], videos=[[f] for f in batch["frames"]])
        else:
            out = lm_forward(chunk, input_ids=batch["ids"], position_ids=positions)

        def loss_func(logits):  # [b, s, vocab / tp]
            if groups.tp_size > 1:
                logits = _all_gather_cat(logits, -1, groups.tp)
            return logits.sum() * 0, torch.tensor(1), {"logits": logits.detach().clone()}

        return out, loss_func

    with torch.no_grad():
        reports = forward_backward(ddp, step, [{"ids": ids, "frames": frames}], seq_length=ids.shape[1],
                                   micro_batch_size=ids.shape[0], forward_only=True)
    return reports[0]["logits"] if reports else None


def _layouts_worker(rank, world_size, hf_dirs, out_root):
    from megatron_longvideo.checkpoint.hf_convert import export_model, load_hf_into_model
    from megatron_longvideo.models.llm import build_llm
    from megatron_longvideo.models.llava_onevision.model import build_vlm
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    init_cpu_dist()
    ids, frames = _batch()
    results = {}
    for name, layout in LAYOUTS.items():
        groups = initialize_parallel(ParallelConfig(tensor_parallel_size=layout.get("tp", 1),
                                                    pipeline_parallel_size=layout.get("pp", 1)))
        for kind, cfg in _cfgs().items():
            torch.manual_seed(1)  # a different random init in every layout: the import must overwrite it all
            model = build_vlm(cfg, groups) if kind == "vlm" else build_llm(cfg, groups)
            load_hf_into_model(model, groups, hf_dirs[kind], cfg)
            results[(name, kind)] = _megatron_logits(model, groups, kind, ids, frames)
            export_model(model, groups, cfg, os.path.join(out_root, name, kind), max_shard_size="48KB", progress=False)
        destroy_parallel()
    return results


def _make_hf_models(root):
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2ForCausalLM

    from megatron_longvideo.checkpoint.hf_config import hf_config

    dirs = {}
    for kind, cfg in _cfgs().items():
        torch.manual_seed(7)
        cls = LlavaOnevisionForConditionalGeneration if kind == "vlm" else Qwen2ForCausalLM
        model = cls(hf_config(cfg))
        with torch.no_grad():  # norms and biases away from their 1 / 0 init so that a swapped one shows
            for pname, p in model.named_parameters():
                if "post_layernorm" not in pname:
                    p.add_(torch.randn_like(p) * 0.05)
        dirs[kind] = os.path.join(root, f"hf_{kind}")
        model.save_pretrained(dirs[kind])
    return dirs


def _hf_logits(kind, folder):
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2ForCausalLM

    cls = LlavaOnevisionForConditionalGeneration if kind == "vlm" else Qwen2ForCausalLM
    model, info = cls.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{folder}: transformers reports {bad}"
    ids, frames = _batch()
    with torch.no_grad():
        if kind == "vlm":
            return model.eval()(input_ids=ids, pixel_values_videos=frames).logits
        return model.eval()(input_ids=ids).logits


def _canonical_tensors(kind, folder):
    from megatron_longvideo.checkpoint.hf_io import read_checkpoint
    from megatron_longvideo.checkpoint.hf_map import WeightMap

    weight_map = WeightMap(_cfgs()[kind])
    return {weight_map.canonical_hf_name(n): t for n, t in read_checkpoint(folder)}


def test_export_from_tp1_tp2_pp2_matches_transformers(tmp_path):
    hf_dirs = _make_hf_models(str(tmp_path))
    results = run_ranks(_layouts_worker, 2, hf_dirs, str(tmp_path / "export"))
    worst = {}
    for (name, kind) in [(n, k) for n in LAYOUTS for k in _cfgs()]:
        ours = next(r[(name, kind)] for r in results if r[(name, kind)] is not None)
        folder = tmp_path / "export" / name / kind
        assert (folder / "model.safetensors.index.json").exists(), f"{folder}: expected several shards and an index"
        theirs = _hf_logits(kind, str(folder))
        assert ours.shape == theirs.shape, (name, kind, ours.shape, theirs.shape)
        rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        worst[(name, kind)] = rel
        original, exported = _canonical_tensors(kind, hf_dirs[kind]), _canonical_tensors(kind, str(folder))
        assert set(original) == set(exported), (name, kind, set(original) ^ set(exported))
        changed = [k for k in original if not torch.equal(original[k], exported[k])]
        assert not changed, f"{name}/{kind}: round trip changed {changed[:5]}"
    print("max relative logit differences:", {f"{n}/{k}": f"{v:.2e}" for (n, k), v in worst.items()})
    assert max(worst.values()) < TOL, worst
