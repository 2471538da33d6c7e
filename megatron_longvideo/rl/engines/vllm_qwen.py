"""The ``vllm`` rollout engine for the Qwen2.5-VL family: vLLM's own ``Qwen2_5_VLForConditionalGeneration``
fed our cached video embeddings (``enable_mm_embeds``), so the tower runs once per video per step, in
our encoder, and never in vLLM. What vLLM 0.33.0's source says, and what this engine does about it
(``tests/rl/test_vllm_contract.py`` runs the relevant pieces of that source on our requests):

* Request: ``{"prompt_token_ids": ids, "multi_modal_data": {"video": {"video_embeds": [sum N_v, h],
  "video_grid_thw": [num_videos, 3] int64, "second_per_grid_ts": [num_videos] float32}},
  "multi_modal_uuids": {"video": [cache key, ...]}}`` (a ``TokensPrompt``). vLLM expands each
  ``<|video_pad|>`` of the token ids into ``t * h * w / m^2`` of them (its prompt replacement for token
  prompts), so the ids hold **one** placeholder per video: the engine collapses each run of our expanded
  prompt. The embeddings take the tower's output order (merge blocks, row by row, per temporal patch),
  which is ours; their dtype becomes the model's. The uuids, our cache keys, spare vLLM hashing the
  embeddings (and key its prefix cache).
* Positions: vLLM computes multimodal RoPE from the grid and ``second_per_grid_ts`` (seconds per temporal
  patch, times the config's ``vision_config.tokens_per_second``), and resumes text after a video at the
  largest position + 1: our ``text_after="max"`` rule. A policy with ``text_after="spatial"`` is refused.
* Engine: ``enable_mm_embeds=True`` and ``limit_mm_per_prompt={"image": 0, "video": 0}``: embeddings are
  accepted while the tower is never built (no memory, nothing to sync). vLLM's Qwen2.5-VL processor needs
  a tokenizer (``skip_tokenizer_init`` is refused) and looks up, on every request, its video token
  (``tokenizer.video_token``, else ``<|video_pad|>``), which must have the policy's ``video_token_id``, and
  its image token (``<|image_pad|>``); both are checked here.
* Long videos: vLLM refuses a video with more embedding tokens than its encoder cache, sized
  ``max(max_num_batched_tokens, the processor's largest video)`` (14 frames); ``max_video_tokens`` raises
  ``max_num_batched_tokens`` to it, and requests with a longer video fail here, naming it.
* Folder: ``model_dir`` (an exported Qwen2.5-VL folder), or one written from our config
  (:func:`~megatron_longvideo.models.qwen2_5_vl.hf.hf_config`, architectures
  ``Qwen2_5_VLForConditionalGeneration``, plus the processor configs an export carries,
  :func:`~megatron_longvideo.models.qwen2_5_vl.inputs.processor_configs`) and started with
  ``load_format="dummy"``.
* Weight sync: the language model only, under transformers 5's names (``model.language_model.*``,
  ``lm_head.weight``), which the model's ``hf_to_vllm_mapper`` maps to its ``language_model``. The vision
  tower's weights are never sent: vLLM never runs it with embeddings in, and does not even build it.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional, Sequence

import torch

from megatron_longvideo.checkpoint.hf_map import WeightMap
from megatron_longvideo.models.qwen2_5_vl.inputs import IMAGE_TOKEN, SPECIAL_TOKENS
from megatron_longvideo.rl.engines.base import Completion, SamplingConfig, VideoPrompt, Weights
from megatron_longvideo.rl.engines.vllm_engine import VLLMEngine, tokenizer_folder

__all__ = ["VLLMQwenEngine", "collapse_video_runs", "check_placeholder_tokens", "DEFAULT_VIDEO_TOKEN",
           "DEFAULT_IMAGE_TOKEN"]

DEFAULT_VIDEO_TOKEN, DEFAULT_IMAGE_TOKEN = SPECIAL_TOKENS.video, IMAGE_TOKEN
"""The video and image tokens of transformers' Qwen2.5-VL processor when the tokenizer names none."""


def collapse_video_runs(ids: Sequence[int], video_token_id: int) -> tuple[list[int], list[tuple[int, int]]]:
    """(``ids`` with each run of ``video_token_id`` cut to one token, ``(start, length)`` of each run)."""
    out, runs, i = [], [], 0
    while i < len(ids):
        if ids[i] != video_token_id:
            out.append(ids[i])
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == video_token_id:
            j += 1
        runs.append((i, j - i))
        out.append(video_token_id)
        i = j
    return out, runs


def check_placeholder_tokens(tokenizer_dir: str, video_token_id: int, image_token_id: Optional[int] = None) -> None:
    """Raise ValueError unless the tokenizer in ``tokenizer_dir`` has what vLLM's Qwen2.5-VL processor looks up
    on every request: the video token (``tokenizer.video_token``, else ``<|video_pad|>``) at ``video_token_id``,
    the token it expands, and the image token (``tokenizer.image_token``, else ``<|image_pad|>``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    vocab = tok.get_vocab()
    wanted = (("video", DEFAULT_VIDEO_TOKEN, video_token_id), ("image", DEFAULT_IMAGE_TOKEN, image_token_id))
    for kind, default, want in wanted:
        token = getattr(tok, f"{kind}_token", None) or default
        got = vocab.get(token)
        if got is None or (want is not None and got != want):
            expected = "" if want is None else f", but the policy's {kind}_token_id is {want}"
            raise ValueError(f"tokenizer {tokenizer_dir}: vLLM's Qwen2.5-VL processor looks up the {kind} token "
                             f"{token!r}, which this tokenizer maps to {got}{expected}; use the tokenizer the policy "
                             f"was trained with, {token!r} in its vocabulary")


class VLLMQwenEngine(VLLMEngine):
    """Rollouts of a Qwen2.5-VL policy with vLLM from :class:`~megatron_longvideo.rl.engines.base.VideoPrompt`
    objects (see the module docstring). ``tokenizer``: a Hugging Face tokenizer folder (default: ``model_dir``'s);
    ``max_video_tokens``: the most embedding tokens one video may have (default: what vLLM sizes by itself)."""

    takes_video_prompts = True

    def __init__(self, cfg, *, max_video_tokens: Optional[int] = None, **kwargs):
        # vLLM refuses a video with more embedding tokens than its encoder cache, which holds
        # max(max_num_batched_tokens, the processor's largest video: 14 frames): long videos need more
        if max_video_tokens is not None:
            if not isinstance(max_video_tokens, int) or max_video_tokens < 1:
                raise ValueError(f"max_video_tokens: must be a positive integer, got {max_video_tokens!r}")
            kwargs["max_num_batched_tokens"] = max(kwargs.get("max_num_batched_tokens") or 0, max_video_tokens)
        self.max_video_tokens = max_video_tokens
        super().__init__(cfg, **kwargs)

    def _configure(self, cfg) -> None:
        if getattr(getattr(cfg, "llm", None), "mrope_section", None) is None or not hasattr(cfg, "vision"):
            raise ValueError(f"cfg: expected a Qwen2.5-VL config (an LLM with mrope_section), got {type(cfg).__name__}")
        if cfg.text_after != "max":
            raise ValueError(f"text_after: vLLM resumes text after a video at the largest position + 1 ('max'); "
                             f"this policy trains with {cfg.text_after!r}, so rollouts would see other positions")
        self.cfg = cfg
        self.hidden_size = cfg.llm.hidden_size
        self.weight_map = WeightMap(cfg.llm, megatron_prefix="llm.", ignore_prefixes=("vision.",))

    def _write_folder(self, folder: str) -> None:
        from megatron_longvideo.models.qwen2_5_vl.hf import hf_config
        from megatron_longvideo.models.qwen2_5_vl.inputs import processor_configs

        config = hf_config(self.cfg, bos_token_id=None, eos_token_id=None, pad_token_id=None)  # the tokenizer's
        config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
        config.save_pretrained(folder)
        for name, obj in processor_configs(self.cfg).items():  # vLLM reads the merge size from them, never pixels
            with open(os.path.join(folder, name), "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True)

    def _engine_kwargs(self) -> dict:
        source = self.tokenizer or self.model_dir
        if tokenizer_folder(source) is None:
            raise ValueError(f"tokenizer: vLLM's Qwen2.5-VL processor needs a Hugging Face tokenizer folder (it finds "
                             f"videos by their token), {source} holds none; pass tokenizer=<folder>, or "
                             f"model_dir=<an exported folder with one>")
        check_placeholder_tokens(source, self.cfg.video_token_id, self.cfg.image_token_id)
        return dict(tokenizer=self.tokenizer, skip_tokenizer_init=False, enable_mm_embeds=True,
                    limit_mm_per_prompt={"image": 0, "video": 0})  # embeddings in, the tower never built

    # -- requests ----------------------------------------------------------------------------------------
    def build_video_requests(self, prompts: Sequence[VideoPrompt]) -> list[dict]:
        """vLLM ``TokensPrompt`` dicts with the videos' embeddings (CPU tensors; see the module docstring)."""
        if len(prompts) == 0:
            raise ValueError("prompts: expected at least one VideoPrompt")
        return [self._video_request(i, p) for i, p in enumerate(prompts)]

    def _video_request(self, i: int, p: VideoPrompt) -> dict:
        m, h = self.cfg.vision.spatial_merge_size, self.hidden_size
        n = len(p.videos)
        if n == 0 or len(p.grids) != n or len(p.seconds_per_grid) != n or (p.keys and len(p.keys) != n):
            raise ValueError(f"prompts[{i}]: expected one grid, time step (and key) per video, got {n} videos, "
                             f"{len(p.grids)} grids, {len(p.seconds_per_grid)} time steps, {len(p.keys or ())} keys")
        ids, runs = collapse_video_runs([int(t) for t in p.prompt_ids.tolist()], self.cfg.video_token_id)
        if len(runs) != n:
            raise ValueError(f"prompts[{i}].prompt_ids: {len(runs)} runs of the video token {self.cfg.video_token_id}, "
                             f"expected one per video ({n})")
        for v, ((_, length), e, grid) in enumerate(zip(runs, p.videos, p.grids)):
            if len(grid) != 3:
                raise ValueError(f"prompts[{i}].grids[{v}]: expected (t, h, w), got {tuple(grid)}")
            t, gh, gw = (int(x) for x in grid)
            tokens = t * gh * gw // (m * m)
            if gh % m or gw % m or length != tokens or tuple(e.shape) != (tokens, h):
                raise ValueError(f"prompts[{i}].videos[{v}]: grid {tuple(grid)} makes {tokens} tokens of width {h}; "
                                 f"the prompt holds {length} placeholders and the embeddings have shape {tuple(e.shape)}")
            if self.max_video_tokens is not None and tokens > self.max_video_tokens:
                raise ValueError(f"prompts[{i}].videos[{v}]: {tokens} video tokens, more than max_video_tokens="
                                 f"{self.max_video_tokens} (vLLM's encoder cache would refuse it); build the engine "
                                 f"with a larger max_video_tokens")
        video = {
            "video_embeds": torch.cat([e.detach().to("cpu", dtype=self.dtype or e.dtype) for e in p.videos]),  # [sum N_v, h]
            "video_grid_thw": torch.tensor([[int(x) for x in g] for g in p.grids], dtype=torch.int64),  # [num_videos, 3]
            "second_per_grid_ts": torch.tensor([float(s) for s in p.seconds_per_grid], dtype=torch.float32),  # [num_videos]
        }
        request = {"prompt_token_ids": ids, "multi_modal_data": {"video": video}}
        if p.keys and all(k is not None for k in p.keys):
            request["multi_modal_uuids"] = {"video": [str(k) for k in p.keys]}
        return request

    def generate(self, prompt_embeds: Sequence[torch.Tensor], sampling: SamplingConfig, *, seeds=None) -> list[list[Completion]]:
        raise NotImplementedError("VLLMQwenEngine takes VideoPrompts (generate_videos): vLLM merges the video "
                                  "embeddings and computes Qwen2.5-VL's positions itself")

    def generate_videos(self, prompts: Sequence[VideoPrompt], sampling: SamplingConfig, *,
                        seeds: Optional[Sequence[Sequence[Optional[int]]]] = None) -> list[list[Completion]]:
        return self._run(self.build_video_requests(prompts), sampling, seeds)

    # -- weights -----------------------------------------------------------------------------------------
    def hf_weights(self, weights: Weights) -> Iterator[tuple[str, torch.Tensor]]:
        """The language model's tensors under transformers 5's Qwen2.5-VL names, in the engine's dtype
        (a policy's ``vision.*`` tensors are passed over)."""
        from megatron_longvideo.models.qwen2_5_vl.hf import hf_language_model_items

        for name, t in hf_language_model_items(self.weight_map.to_hf(weights)):
            yield name, t.to(dtype=self.dtype) if self.dtype is not None and t.is_floating_point() else t
