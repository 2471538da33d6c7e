"""A peer side by side: the log-prob and update passes of one GRPO group computed the way TRL computes them,
against ours, on the same model, frames and responses, in the same run.

* **TRL's way** (TRL 0.25.0, ``GRPOTrainer``): a transformers model forward over the G separate
  ``[prompt | completion]`` rows of the group, completions right-padded and masked, each row carrying the
  whole video, which the model's own vision path encodes again for every row of every pass. The per-token
  log-probs follow ``GRPOTrainer._get_per_token_logps_and_entropies``: rows in chunks of ``--peer-batch-size``,
  ``logits_to_keep`` = completion length + 1, the last logit dropped, divided by the temperature, then
  ``trl.trainer.utils.selective_log_softmax`` (TRL's own function, called). That method needs a trainer and
  cannot pass ``pixel_values_videos``, so its loop is reproduced here, not called. The update is
  ``GRPOTrainer._compute_loss``'s "dapo" loss (TRL 0.25's default: the clipped ratio against the old
  log-probs, ``epsilon`` 0.2, plus ``beta`` x the k3 KL to the reference, summed over the completion tokens
  and divided by their number), backward over the chunks, one AdamW step. ``beta`` is 0.04 here (TRL's
  default is 0, which skips the reference pass; ours runs one). The tower is frozen on both sides.
* **Ours**: the library's ``GRPOTrainer`` passes (``_logprobs`` for the old policy and the reference,
  ``update``) on the megatron-core model the HF one was exported from (``checkpoint.hf_convert.export_model``):
  the video encoded once into the embedding cache, the G responses packed behind one copy of the prefix,
  the row sharded over ``--ranks`` CP ranks (1: world=1).

Two families (``--family``; a ``--cost-match`` model brings its own):

* ``llava_onevision`` (default): ``LlavaOnevisionForConditionalGeneration`` (SigLIP, projector, bilinear
  pooling, newline; the tower, projector and newline frozen), each row's ``pixel_values_videos`` the frames
  ``[T, 3, H, W]``; ours ``models.llava_onevision.model.build_vlm``.
* ``qwen2_5_vl``: ``Qwen2_5_VLForConditionalGeneration`` (window-attention ViT and merger, ``model.model.visual``,
  frozen), the video passed as a Qwen2.5-VL processor hands it over: ``pixel_values_videos`` the flattened
  patches of all the chunk's rows concatenated (``[rows x N, 3 x 2 x p x p]``), ``video_grid_thw`` one
  ``(t, h, w)`` per row and ``second_per_grid_ts`` (0.5 s between frames, ours' default: 1 s per temporal
  patch). Ours ``models.qwen2_5_vl.model.build_qwen25vl``. The multimodal RoPE positions are transformers' own,
  which needed care; checked against the installed transformers 5.24.0's ``modeling_qwen2_5_vl.py``:

  - ``Qwen2_5_VLModel.compute_3d_position_ids`` builds the three position rows only when the processor's
    ``mm_token_type_ids`` are passed; without them (TRL 0.25 forwards ``token_type_ids`` only) every token gets
    plain 1-D positions.
  - ``get_rope_index`` resumes the text after a video at its start + max(h, w) / merge, not at the largest
    position + 1 (the library's default ``text_after="max"``, the reference code's and transformers 4.x's
    rule): ours runs with the installed version's rule (``text_after="spatial"`` on 5.x) so the prompts'
    positions are the same.
  - Its rope delta (largest position + 1 - length) is where ``generate`` puts the completion, and where our
    rollouts and log-prob passes put it; a forward over ``[prompt | completion]`` instead continues the text
    after the prompt's last position. The two differ once the video's temporal rows reach past the text after
    it (here from 16 frames), so such a forward scores the completion at positions it was not generated at.
    TRL's side therefore passes ``position_ids``: ``get_rope_index`` of the prompt, the completion at its rope
    delta (computed once per group; host work). On transformers 4.x (not run here) the forward derives these
    same positions itself and none are passed.

  Frame counts should be even (two frames per temporal patch; an odd last frame is repeated on both sides).

The learning rate is 0 on both sides (the optimizer step still runs), so every repeat computes with the same
weights and the two sides' log-probs must agree: the script reports the largest difference per frame count
and fails above ``--tolerance`` (1e-4). TRL's way runs in one process with ``--ranks`` torch threads, ours on
``--ranks`` ranks of one thread each: the same cores.

    python benchmarks/peer_trl.py --frames 64 256 1024 --repeats 3 --out docs/results/peer_trl_cpu.md
    python benchmarks/peer_trl.py --cost-match llava --frames 64 256 1024 --out docs/results/peer_trl_llava.md
    python benchmarks/peer_trl.py --cost-match qwen --frames 64 256 1024 --out docs/results/peer_trl_qwen.md
    python benchmarks/peer_trl.py --quick --out /tmp/peer.md        # smoke size (CI)
    python benchmarks/peer_trl.py --quick --family qwen2_5_vl --out /tmp/peer_qwen.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import types

import torch

from megatron_longvideo.parallel.spawn import init_cpu_dist, run_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cost_model  # noqa: E402
from common import emit  # noqa: E402

VIDEO_ID, PAD_ID, VOCAB = 3, 0, 304
PASSES = ("old", "ref", "update")
FAMILIES = {"llava_onevision": ("LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration"),
            "qwen2_5_vl": ("Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration")}
"""``--family`` -> (its name in the report, the transformers class TRL's way loads)."""


def _matched(name: str):
    """The ``--cost-match`` CPU model (``cost_model.matched``: one of ``cost_model.MATCH_NAMES``)."""
    return cost_model.matched(name, vocab_size=VOCAB)


def _hf_text_after() -> str:
    """Where the installed transformers resumes the text after a video in Qwen2.5-VL's positions (our
    ``Qwen25VLConfig.text_after``): 5.x ``get_rope_index`` at start + max(h, w) / merge ("spatial", read in
    5.24.0's source), 4.x at the largest position + 1 ("max")."""
    import transformers
    from packaging.version import Version

    return "spatial" if Version(transformers.__version__).major >= 5 else "max"


def _model(opts):
    """``(our config, frame side in pixels, placeholder tokens of T frames)`` of the model both sides run: the
    tiny one of ``opts["family"]`` or the ``--cost-match`` one, the tower frozen (TRL's side freezes it too)."""
    family = opts["family"]
    if opts.get("cost_match"):
        m = _matched(opts["cost_match"])
        llm, vision, size = m.llm, m.vision, m.image_size
    elif family == "qwen2_5_vl":  # 112 px frames: 8 x 8 patches, 2 x 2 windows of 56 px, 16 tokens per 2 frames
        from megatron_longvideo.models.llm import LLMConfig
        from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

        llm, vision, size = LLMConfig.tiny(vocab_size=VOCAB, mrope_section=(2, 3, 3)), QwenVisionConfig(window_size=56), 112
    else:
        from megatron_longvideo.models.llm import LLMConfig
        from megatron_longvideo.models.llava_onevision.vision import VisionConfig

        llm, vision = LLMConfig.tiny(vocab_size=VOCAB), VisionConfig()
        size = vision.image_size
    # larger weights than the default 0.02 so the log-probs are far from uniform and a mismatch would show
    llm = dataclasses.replace(llm, init_std=0.1)
    if family == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig

        cfg = Qwen25VLConfig(llm=llm, vision=dataclasses.replace(vision, freeze=True), video_token_id=VIDEO_ID,
                             text_after=_hf_text_after())
        return cfg, size, lambda t: cfg.num_video_tokens(t, size, size)
    from megatron_longvideo.models.llava_onevision.model import VLMConfig

    cfg = VLMConfig(llm=llm, vision=dataclasses.replace(vision, freeze=True, freeze_projector=True), video_token_id=VIDEO_ID)
    return cfg, size, cfg.vision.num_video_tokens


def _group(model, opts, frames: int, rep: int):
    """The same inputs on both sides (``model``: what :func:`_model` returns): frames ``[T, 3, H, W]``, prompt ids
    ``[P]`` and G responses (token id lists of lengths between half of ``response_len`` and all of it)."""
    _, size, video_tokens = model
    gen = torch.Generator().manual_seed(1000 * frames + rep)
    video = torch.randn(frames, 3, size, size, generator=gen)
    text = torch.randint(4, VOCAB, (12,), generator=gen)
    ids = torch.cat([text[:2], torch.full((video_tokens(frames),), VIDEO_ID), text[2:]])
    lo = max(1, opts["response_len"] // 2)
    responses = [torch.randint(4, VOCAB, (int(torch.randint(lo, opts["response_len"] + 1, (1,), generator=gen)),),
                               generator=gen).tolist() for _ in range(opts["group_size"])]
    advantages = torch.randn(1, opts["group_size"], generator=gen)
    return video, ids, responses, advantages


# -- ours ------------------------------------------------------------------------------------------------ #
def _ours(rank, world_size, opts, folder):
    init_cpu_dist()
    from megatron_longvideo.checkpoint.hf_convert import export_model
    from megatron_longvideo.models.encode import encode_stats
    from megatron_longvideo.models.video_cache import VideoEmbeddingCache
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.engines.base import SamplingConfig
    from megatron_longvideo.rl.losses import GRPOLossConfig
    from megatron_longvideo.rl.rollout import RLPrompt
    from megatron_longvideo.rl.trainer import GRPOConfig, GRPOTrainer, Rollouts
    from megatron_longvideo.training.engine import OptimConfig, build_optimizer, wrap_ddp

    model = _model(opts)
    cfg = model[0]
    if opts["family"] == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl as build
    else:
        from megatron_longvideo.models.llava_onevision.model import build_vlm as build
    groups = initialize_parallel(ParallelConfig(context_parallel_size=world_size), seed=1)
    torch.manual_seed(1)
    policy = build(cfg, groups)
    torch.manual_seed(1)
    reference = build(cfg, groups)
    reference.requires_grad_(False)
    export_model(policy, groups, cfg, folder, progress=False)  # what TRL's side loads
    ddp = wrap_ddp(policy, groups)
    optimizer = build_optimizer([ddp], OptimConfig(lr=0.0, clip_grad=1.0))
    grpo = GRPOConfig(group_size=opts["group_size"], prompts_per_step=1, pack=True, responses_per_microbatch=None,
                      sampling=SamplingConfig(max_new_tokens=opts["response_len"], temperature=1.0),
                      loss=GRPOLossConfig(kl_beta=opts["beta"]), log_samples_every=0)
    tokenizer = types.SimpleNamespace(pad_id=PAD_ID, eos_id=1, vocab_size=VOCAB)  # the passes read pad_id only
    trainer = GRPOTrainer(grpo, policy=ddp, optimizer=optimizer, groups=groups, tokenizer=tokenizer, engine=None,
                          reference=reference, cache=VideoEmbeddingCache(max_bytes=8 << 30), log=lambda s: None)

    def one(frames, rep):
        video, ids, responses, advantages = _group(model, opts, frames, rep)
        prompt = RLPrompt(videos=(video,), prompt_ids=ids, ground_truth=None, content_ids=(f"peer-{frames}-{rep}",))
        ro = Rollouts([prompt], [responses], torch.zeros(1, len(responses)), {}, advantages)
        trainer._versions = {}
        times, encode = {}, {}
        out = {}
        for name in PASSES:
            e0 = encode_stats().seconds
            torch.distributed.barrier()
            t0 = time.perf_counter()
            if name == "old":
                out["old"] = trainer._logprobs(ddp, ro, [0])
            elif name == "ref":
                out["ref"] = trainer._logprobs(reference, ro, [0])
            else:
                trainer.update(ro, [0], out["old"], out["ref"])
            times[name] = time.perf_counter() - t0
            encode[name] = encode_stats().seconds - e0
        return times, encode, {k: torch.cat(v).tolist() for k, v in out.items()}

    one(opts["frames"][0], -1)  # warm-up
    results = {}
    for frames in opts["frames"]:
        runs = [one(frames, rep) for rep in range(opts["repeats"])]
        results[frames] = {"time": {p: statistics.median(r[0][p] for r in runs) for p in PASSES},
                           "encode": {p: statistics.median(r[1][p] for r in runs) for p in PASSES},
                           "logp": [r[2] for r in runs]}
    destroy_parallel()
    return results


# -- TRL's way ------------------------------------------------------------------------------------------ #
def _row_inputs(family: str, cfg, hf_model, video: torch.Tensor, prompt_ids: torch.Tensor):
    """What a transformers user of ``family`` passes with every row besides the ids: a function of a chunk's
    rows ``[rows, S]`` (the prompt ``prompt_ids`` ``[P]``, then the completion) -> forward keyword arguments
    (see the module docstring).

    LLaVA-OneVision: ``pixel_values_videos`` ``[rows, T, 3, H, W]``, a copy of the frames per row. Qwen2.5-VL:
    the frames flattened to patches once (the processor's work), then per chunk the rows' patches concatenated
    ``[rows x N, patch_dim]`` with one ``video_grid_thw`` per row; on transformers 5 also ``position_ids``:
    ``get_rope_index`` of the prompt (given the processor's ``mm_token_type_ids`` and ``second_per_grid_ts``),
    the completion continuing at its rope delta, where ``generate`` put it. transformers 4 derives the same
    positions in the forward, from the ids."""
    if family == "llava_onevision":
        return lambda ids: {"pixel_values_videos": video[None].repeat(ids.shape[0], 1, 1, 1, 1)}  # each encoded again
    import inspect

    from megatron_longvideo.models.qwen2_5_vl.vision import frames_to_patches
    from megatron_longvideo.rl.rollout import ROLLOUT_SECONDS_PER_FRAME

    patches, grid = frames_to_patches(video, cfg.vision)
    seconds = ROLLOUT_SECONDS_PER_FRAME * cfg.vision.temporal_patch_size  # per temporal patch: ours' default spacing
    prefix = None
    if "mm_token_type_ids" in inspect.signature(hf_model.forward).parameters:  # transformers 5
        prompt = prompt_ids[None]
        prefix, delta = hf_model.model.get_rope_index(prompt, mm_token_type_ids=(prompt == cfg.video_token_id).int() * 2,
                                                      video_grid_thw=torch.tensor([grid]),
                                                      second_per_grid_ts=torch.tensor([seconds]))  # [3, 1, P], [1, 1]

    def rows(ids):
        n, length = ids.shape
        kwargs = {"pixel_values_videos": patches.repeat(n, 1), "video_grid_thw": torch.tensor([grid] * n),
                  "second_per_grid_ts": torch.full((n,), seconds)}
        if prefix is not None:
            completion = (torch.arange(prefix.shape[-1], length) + delta[0, 0]).expand(3, n, -1)
            kwargs["position_ids"] = torch.cat([prefix.expand(3, n, -1), completion], dim=-1)  # [3, rows, S]
        return kwargs

    return rows


def _trl_logps(model, input_ids, attention_mask, row_inputs, logits_to_keep, batch_size, temperature=1.0):
    """Per-token log-probs ``[rows, logits_to_keep]`` of the completions, computed as TRL 0.25.0's
    ``GRPOTrainer._get_per_token_logps_and_entropies`` does (see the module docstring), every row with the
    whole video: ``row_inputs(ids)`` gives a chunk's other arguments (:func:`_row_inputs`)."""
    from trl.trainer.utils import selective_log_softmax

    out = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size]
        logits = model(input_ids=ids, attention_mask=attention_mask[start : start + batch_size], **row_inputs(ids),
                       logits_to_keep=logits_to_keep + 1, use_cache=False).logits
        logits = logits[:, :-1, :][:, -logits_to_keep:, :] / temperature  # [rows, K, V]
        out.append(selective_log_softmax(logits, ids[:, -logits_to_keep:]))
    return torch.cat(out)


def _tower(family: str, model):
    """The vision tower of a transformers model of ``family`` (``Qwen2_5_VLModel.visual`` holds the merger too)."""
    return model.model.visual if family == "qwen2_5_vl" else model.model.vision_tower


def _hf_model(family: str, folder: str):
    """The exported folder as transformers' model, its tower (and whatever ours freezes with it) frozen:
    LLaVA-OneVision's ``model.vision_tower``, ``multi_modal_projector`` and ``image_newline`` (ours: ``freeze``,
    ``freeze_projector``); Qwen2.5-VL's ``model.visual``, the ViT with its merger (ours: ``freeze``)."""
    import transformers

    model = getattr(transformers, FAMILIES[family][1]).from_pretrained(folder, dtype=torch.float32)
    _tower(family, model).requires_grad_(False)
    if family == "llava_onevision":
        model.model.multi_modal_projector.requires_grad_(False)
        model.model.image_newline.requires_grad_(False)
    return model


def _trl(rank, world_size, opts, folder):
    init_cpu_dist()
    import copy

    torch.set_num_threads(opts["ranks"])  # the cores ours spreads over its ranks
    spec = _model(opts)
    cfg, family = spec[0], opts["family"]
    model = _hf_model(family, folder)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    encode = [0.0]

    def timed_tower(module, _):  # the vision tower's time, through forward hooks
        module._t0 = time.perf_counter()

    def done_tower(module, _, __):
        encode[0] += time.perf_counter() - module._t0

    for m in (model, reference):
        _tower(family, m).register_forward_pre_hook(timed_tower)
        _tower(family, m).register_forward_hook(done_tower)
    eps, beta, bs = 0.2, opts["beta"], opts["peer_batch_size"]

    def one(frames, rep):
        video, ids, responses, advantages = _group(spec, opts, frames, rep)
        extra = _row_inputs(family, cfg, model, video, ids)
        k = max(len(r) for r in responses)
        completion = torch.full((len(responses), k), PAD_ID, dtype=torch.long)
        mask = torch.zeros(len(responses), k, dtype=torch.long)
        for i, r in enumerate(responses):  # right-padded completions
            completion[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        input_ids = torch.cat([ids[None].expand(len(responses), -1), completion], dim=1)  # [G, P + K]
        attention_mask = torch.cat([torch.ones(len(responses), ids.numel(), dtype=torch.long), mask], dim=1)
        times, enc, out = {}, {}, {}
        for name in PASSES:
            e0 = encode[0]
            t0 = time.perf_counter()
            if name in ("old", "ref"):
                with torch.no_grad():
                    out[name] = _trl_logps(model if name == "old" else reference, input_ids, attention_mask, extra, k, bs)
            else:  # GRPOTrainer._compute_loss, loss_type "dapo", gradient accumulation over the chunks
                optimizer.zero_grad()
                adv = advantages[0]
                for s in range(0, len(responses), bs):
                    logp = _trl_logps(model, input_ids[s : s + bs], attention_mask[s : s + bs], extra, k, bs)
                    old, ref, m = out["old"][s : s + bs], out["ref"][s : s + bs], mask[s : s + bs].float()
                    ratio = torch.exp(logp - old)
                    loss = -torch.min(ratio * adv[s : s + bs, None], ratio.clamp(1 - eps, 1 + eps) * adv[s : s + bs, None])
                    loss = loss + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
                    ((loss * m).sum() / mask.sum()).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            times[name] = time.perf_counter() - t0
            enc[name] = encode[0] - e0
        logp = {n: torch.cat([out[n][i, : len(r)] for i, r in enumerate(responses)]).tolist() for n in ("old", "ref")}
        return times, enc, logp

    one(opts["frames"][0], -1)  # warm-up
    results = {}
    for frames in opts["frames"]:
        runs = [one(frames, rep) for rep in range(opts["repeats"])]
        results[frames] = {"time": {p: statistics.median(r[0][p] for r in runs) for p in PASSES},
                           "encode": {p: statistics.median(r[1][p] for r in runs) for p in PASSES},
                           "logp": [r[2] for r in runs]}
    return results


# -------------------------------------------------------------------------------------------------------- #
def compare(ours: dict, peer: dict) -> dict:
    """Per frame count, the largest |ours - TRL's| log-prob over every repeat, target and log-prob pass."""
    out = {}
    for frames, o in ours.items():
        worst = 0.0
        for mine, theirs in zip(o["logp"], peer[frames]["logp"]):
            for name in ("old", "ref"):
                a, b = torch.tensor(mine[name]), torch.tensor(theirs[name])
                assert a.shape == b.shape, (frames, name, a.shape, b.shape)
                worst = max(worst, (a - b).abs().max().item())
        out[frames] = worst
    return out


def _describe(opts: dict) -> str:
    """The report's model sentence: the family, transformers' class against our builder, the shapes."""
    import transformers

    cfg, size, video_tokens = _model(opts)
    family, llm, v = opts["family"], cfg.llm, cfg.vision
    name, cls = FAMILIES[family]
    which = f"the `--cost-match {opts['cost_match']}` CPU model" if opts.get("cost_match") else "the tiny model"
    if family == "qwen2_5_vl":
        builder = "build_qwen25vl"
        tower = (f"ViT {v.depth} x {v.hidden_size} (patch {v.patch_size}, window {v.window_size} px, full attention in "
                 f"{list(v.fullatt_block_indexes)}) on {size} px frames ({video_tokens(2)} tokens per 2 frames); multimodal "
                 f"RoPE with the text after the video at transformers {transformers.__version__}'s rule (`text_after="
                 f"\"{cfg.text_after}\"`)")
    else:
        builder = "build_vlm"
        tower = f"ViT {v.num_layers} x {v.hidden_size} on {size} px frames ({v.tokens_per_frame} tokens per frame)"
    return (f"Model: {name}, {which}: transformers' `{cls}` against ours (`{builder}`, exported to it); "
            f"LLM {llm.num_layers} x {llm.hidden_size}, {tower}")


def report(ours: dict, peer: dict, diff: dict, opts: dict) -> str:
    name = FAMILIES[opts["family"]][0]
    lines = [f"## Peer, {name}: TRL's way (transformers, G separate rows) against ours (cache + packing, CP={opts['ranks']})", "",
             f"Command: `{opts['command']}`", "",
             f"{_describe(opts)}; one group of G={opts['group_size']} "
             f"responses of {max(1, opts['response_len'] // 2)}-{opts['response_len']} tokens; TRL's way in chunks of "
             f"{opts['peer_batch_size']} rows with {opts['ranks']} torch threads, ours on {opts['ranks']} rank(s) of one thread; "
             f"KL beta {opts['beta']}; learning rate 0 on both sides; median of {opts['repeats']} repeat(s). Seconds per pass "
             "(the encode time inside it in brackets):", "",
             "| frames | pass | TRL's way (s) | ours (s) | speed-up | log-probs agree (max abs diff) |", "|---:|---|---:|---:|---:|---|"]
    for frames in opts["frames"]:
        o, p = ours[frames], peer[frames]
        for name, label in (("old", "old-policy log-probs"), ("ref", "reference log-probs"), ("update", "update (fwd + bwd + step)")):
            agree = f"{'yes' if diff[frames] <= opts['tolerance'] else 'NO'} ({diff[frames]:.1e})" if name == "old" else ""
            lines.append(f"| {frames} | {label} | {p['time'][name]:.3f} ({p['encode'][name]:.3f}) | {o['time'][name]:.3f} "
                         f"({o['encode'][name]:.3f}) | {p['time'][name] / max(o['time'][name], 1e-9):.2f}x | {agree} |")
        total_p, total_o = sum(p["time"].values()), sum(o["time"].values())
        lines.append(f"| {frames} | all three | {total_p:.3f} | {total_o:.3f} | {total_p / max(total_o, 1e-9):.2f}x | |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--ranks", type=int, default=2, help="our CP ranks; TRL's way gets as many torch threads")
    parser.add_argument("--peer-batch-size", type=int, default=None, help="rows per forward on TRL's side (default: G)")
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient on both sides (> 0: a reference pass)")
    parser.add_argument("--family", choices=list(FAMILIES), default=None,
                        help="the model family (default llava_onevision; a --cost-match model brings its own)")
    parser.add_argument("--cost-match", choices=list(cost_model.MATCH_NAMES), default=None,
                        help="the cost-matched CPU model (benchmarks/cost_model.py)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest log-prob difference accepted")
    parser.add_argument("--quick", action="store_true", help="smoke size: 2 and 4 frames, G=4, responses of up to 4")
    parser.add_argument("--out", help="write the report here (and the numbers as JSON beside it)")
    args = parser.parse_args(argv)
    family = args.family
    if args.cost_match:
        matched = _matched(args.cost_match).reference.family
        if family is not None and family != matched:
            parser.error(f"--cost-match {args.cost_match} is a {matched} model, not --family {family}")
        family = matched
    if args.quick:
        args.frames, args.group_size, args.response_len, args.repeats = [2, 4], 4, 4, 1
    opts = dict(family=family or "llava_onevision", frames=args.frames, group_size=args.group_size,
                response_len=args.response_len, ranks=args.ranks,
                peer_batch_size=args.peer_batch_size or args.group_size, beta=args.beta, cost_match=args.cost_match,
                repeats=args.repeats, tolerance=args.tolerance,
                command="python benchmarks/peer_trl.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="mlv_peer_trl_") as tmp:
        folder = os.path.join(tmp, "hf")
        ours = run_ranks(_ours, args.ranks, opts, folder, timeout=7200)[0]
        peer = run_ranks(_trl, 1, opts, folder, timeout=7200)[0]
    diff = compare(ours, peer)
    if args.out and os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    text = emit(report(ours, peer, diff, opts), args.out)
    if args.out:
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"options": opts, "max_logp_diff": diff,
                       "ours": {k: {n: v[n] for n in ("time", "encode")} for k, v in ours.items()},
                       "trl": {k: {n: v[n] for n in ("time", "encode")} for k, v in peer.items()}}, f, indent=1)
    if max(diff.values()) > args.tolerance:
        print(f"log-probs differ by {max(diff.values()):.2e} > {args.tolerance}: not the same computation", file=sys.stderr)
        return ""
    return text


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
