"""The Qwen2.5-VL model: its vision tower on the first pipeline stage, the LLM with multimodal RoPE.

``qwen_vlm_forward`` runs one micro-batch: each video's temporal patches are encoded over the encode
group (MR-SP stage 1, with the embedding cache), the tokens replace the video placeholders (:func:`~megatron_longvideo.models.merge.merge_video_tokens`),
the three position rows are computed for the whole sequence on the host and sharded with the tokens
over CP, and the LLM runs with them. CP prefill, packing and rollouts for this family are the next
part of issue 14; so is the converter command line.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from megatron_longvideo.models.llm import LLMConfig, lm_forward, unwrap
from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig, build_qwen_vision_tower
from megatron_longvideo.models.vlm import VisionLanguageModel
from megatron_longvideo.parallel.groups import ParallelGroups

__all__ = ["Qwen25VLConfig", "Qwen25VLModel", "build_qwen25vl", "qwen_vlm_forward", "video_grid", "qwen25vl_config_from_hf",
           "load_hf_state", "hf_state"]

DEFAULT_SECONDS_PER_FRAME = 0.5
"""Frame spacing taken when a video carries no timestamps (RL prompts): 2 fps, as qwen-vl-utils samples."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen25VLConfig:
    """A Qwen2.5-VL: LLM (with ``mrope_section``), vision tower, placeholder ids and the position rule."""

    llm: LLMConfig = dataclasses.field(default_factory=lambda: LLMConfig(mrope_section=(2, 3, 3)))
    vision: QwenVisionConfig = dataclasses.field(default_factory=QwenVisionConfig)
    video_token_id: int = 3
    image_token_id: Optional[int] = None
    text_after: str = "max"
    """Where text resumes after a video in the positions (see :mod:`~megatron_longvideo.models.qwen2_5_vl.rope`)."""

    def __post_init__(self):
        if self.llm.mrope_section is None:
            raise ValueError("Qwen2.5-VL's LLM needs mrope_section (multimodal RoPE)")
        if self.vision.out_hidden_size != self.llm.hidden_size:
            raise ValueError(f"vision.out_hidden_size={self.vision.out_hidden_size} must equal llm.hidden_size="
                             f"{self.llm.hidden_size}")

    def positions(self, input_ids: torch.Tensor, videos: Sequence[torch.Tensor],
                  seconds_per_frame: Optional[Sequence[float]] = None):
        """``(positions [3, b, s], deltas [b, 1])`` of host ``input_ids`` whose video runs are ``videos``
        (frames ``[T, 3, H, W]``, in order), frames ``seconds_per_frame`` apart (default 0.5 s: 2 fps)."""
        from megatron_longvideo.models.qwen2_5_vl.rope import mrope_position_ids

        v = self.vision
        spacing = [DEFAULT_SECONDS_PER_FRAME] * len(videos) if seconds_per_frame is None else [float(x) for x in seconds_per_frame]
        grids = [video_grid(self, frames) for frames in videos]
        return mrope_position_ids(input_ids.cpu(), video_token_id=self.video_token_id,
                                  video_grid_thw=torch.tensor(grids) if grids else None,
                                  second_per_grid_ts=[x * v.temporal_patch_size for x in spacing],  # per temporal patch
                                  tokens_per_second=v.tokens_per_second, spatial_merge_size=v.spatial_merge_size,
                                  text_after=self.text_after)

    def num_video_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Placeholder tokens a video of ``num_frames`` frames of ``height x width`` pixels takes."""
        v = self.vision
        t = -(-num_frames // v.temporal_patch_size)
        return t * (height // v.patch_size) * (width // v.patch_size) // v.merge_unit


class Qwen25VLModel(VisionLanguageModel):
    """LLM (multimodal RoPE) + the window-attention vision tower and merger."""

    def __init__(self, cfg: Qwen25VLConfig, groups: ParallelGroups, *, seed: int = 0, **llm_kwargs):
        def tower(llm):
            return build_qwen_vision_tower(cfg.vision, groups, seed=seed + 1,
                                           attention_kernel=llm_kwargs.get("attention_kernel", "auto"),
                                           params_dtype=llm_kwargs.get("params_dtype", torch.float32),
                                           device=llm_kwargs.get("device"))

        super().__init__(cfg, groups, tower, **llm_kwargs)

    def prefill_positions(self, batch, videos, seconds_per_frame=None) -> torch.Tensor:
        """Multimodal positions ``[3, rows, S]`` of a prefill batch (the hook
        :func:`~megatron_longvideo.models.prefill.prefill_forward` calls): each row's prefix as
        :func:`~megatron_longvideo.models.qwen2_5_vl.rope.mrope_position_ids` places it, responses where
        they would be unpacked. ``videos[g]`` are group ``g``'s frames; frames 0.5 s apart by default."""
        from megatron_longvideo.models.qwen2_5_vl.rope import expand_positions

        per_group = {}
        prefix_positions, deltas = [], []
        for r, g in enumerate(batch.row_group):
            if g not in per_group:
                p = int(batch.prefix_lens[r])
                pos, delta = self.cfg.positions(batch.input_ids[r : r + 1, :p], [] if videos is None else videos[g],
                                                None if seconds_per_frame is None else seconds_per_frame[g])
                per_group[g] = (pos[:, 0], int(delta[0, 0]))
            prefix_positions.append(per_group[g][0])
            deltas.append(per_group[g][1])
        return expand_positions(batch.position_ids, batch.prefix_lens.tolist(), prefix_positions, deltas)

    def rollout_positions(self, prompts) -> list[torch.Tensor]:
        """``[3, P_i]`` multimodal positions of RL prompts (``prompt_ids`` and ``videos``, each video's frames
        ``spacing(k)`` apart, default 0.5 s), the hook the GRPO trainer hands the rollout engine."""
        return [self.cfg.positions(p.prompt_ids[None], list(p.videos),
                                   seconds_per_frame=[p.spacing(k) for k in range(len(p.videos))])[0][:, 0]
                for p in prompts]


def build_qwen25vl(cfg: Qwen25VLConfig, groups: ParallelGroups, *, seed: int = 0, **llm_kwargs) -> Qwen25VLModel:
    """This rank's Qwen2.5-VL (call ``torch.manual_seed`` first for the LLM)."""
    return Qwen25VLModel(cfg, groups, seed=seed, **llm_kwargs)


def video_grid(cfg: Qwen25VLConfig, frames: torch.Tensor) -> list[int]:
    """``(t, h, w)`` patch grid of a video ``[T, 3, H, W]`` (an odd last frame is repeated)."""
    v = cfg.vision
    return [-(-frames.shape[0] // v.temporal_patch_size), frames.shape[-2] // v.patch_size, frames.shape[-1] // v.patch_size]


def qwen_vlm_forward(model, groups: ParallelGroups, *, input_ids: torch.Tensor,
                     videos: Optional[Sequence[Sequence[torch.Tensor]]] = None,
                     seconds_per_frame: Optional[Sequence[Sequence[float]]] = None, labels: Optional[torch.Tensor] = None,
                     cache=None, cache_keys: Optional[Sequence[Sequence[str]]] = None, return_merged: bool = False):
    """One micro-batch: ``input_ids`` ``[b, S]`` (S a multiple of 2 x CP), ``videos[i]`` sample i's
    normalised frames ``[T, 3, H, W]``, ``seconds_per_frame[i]`` their frame spacing (default 0.5 s:
    2 fps, qwen-vl-utils' default). The videos are encoded over the encode group, one temporal patch per
    unit (:func:`~megatron_longvideo.models.encode.encode_videos`, with its cache). Returns what the LLM
    returns (per-token loss with ``labels``), and the merged batch with ``return_merged``."""
    from megatron_longvideo.models.encode import encode_videos
    from megatron_longvideo.models.merge import merge_video_tokens
    from megatron_longvideo.models.vlm import text_embeddings
    from megatron_longvideo.platform.device import device_of
    from megatron_longvideo.training.lm_step import cp_shard

    inner = unwrap(model)
    cfg = inner.cfg
    device = device_of(inner)
    host_ids = input_ids.cpu()
    input_ids = input_ids.to(device, non_blocking=True)
    videos = videos or [[] for _ in range(input_ids.shape[0])]
    decoder_input, merged = None, None
    if inner.pre_process:
        flat = [v for sample in videos for v in sample]
        keys = None if cache_keys is None else [k for sample in cache_keys for k in sample]
        encoded = iter(encode_videos(inner.vision, flat, groups, cache=cache, keys=keys) if flat else [])
        embeds = [[next(encoded) for _ in sample] for sample in videos]
        merged = merge_video_tokens(text_embeddings(model, input_ids), input_ids, embeds, cfg.video_token_id)
        decoder_input = cp_shard(merged.embeds, groups, dim=1).transpose(0, 1).contiguous()  # [s_local, b, h]
    spacing = None if seconds_per_frame is None else [x for sample in seconds_per_frame for x in sample]
    positions, _ = cfg.positions(host_ids, [v for sample in videos for v in sample], spacing)
    out = lm_forward(model, decoder_input=decoder_input,
                     position_ids=cp_shard(positions.to(device), groups, dim=-1),
                     labels=None if labels is None else cp_shard(labels.to(device), groups))
    return (out, merged) if return_merged else out


def qwen25vl_config_from_hf(config, *, text_after: str = "max") -> Qwen25VLConfig:
    """Our config of a ``Qwen2_5_VLConfig`` (object or ``config.json`` dict)."""
    from megatron_longvideo.models.qwen2_5_vl.hf import _get, llm_config_from_hf, vision_config_from_hf

    if _get(config, "model_type") != "qwen2_5_vl":
        raise ValueError(f"expected a Qwen2.5-VL config (model_type 'qwen2_5_vl'), got {_get(config, 'model_type')!r}")
    return Qwen25VLConfig(llm=llm_config_from_hf(config), vision=vision_config_from_hf(config),
                          video_token_id=_get(config, "video_token_id"), image_token_id=_get(config, "image_token_id"),
                          text_after=text_after)


def load_hf_state(model, groups: ParallelGroups, items) -> None:
    """Load a Qwen2.5-VL's HF ``(name, tensor)`` pairs into this rank's shards of ``model`` (any TP/PP)."""
    from megatron_longvideo.checkpoint.full_state import load_full_state
    from megatron_longvideo.checkpoint.hf_map import WeightMap
    from megatron_longvideo.models.qwen2_5_vl.hf import language_model_items, vision_items

    inner = unwrap(model)
    items = list(items)
    load_full_state(inner.llm, dict(WeightMap(inner.cfg.llm).to_megatron(language_model_items(items))), groups)
    if inner.vision is not None:  # full tensors, sliced for a TP-sharded tower
        load_full_state(inner.vision, dict(vision_items(items, inner.cfg.vision)), groups)


def hf_state(model, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """The model (any TP/PP layout; collective) as a ``Qwen2_5_VLForConditionalGeneration`` state dict
    (transformers 5 names), full shape, on every rank. The tower lives on the first pipeline stage."""
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.full_state import gather_full_state
    from megatron_longvideo.checkpoint.hf_map import WeightMap
    from megatron_longvideo.models.qwen2_5_vl.hf import hf_language_model_items, hf_vision_items

    inner = unwrap(model)
    llm = gather_full_state(inner.llm, groups)
    out = dict(hf_language_model_items(WeightMap(inner.cfg.llm).to_hf(llm)))
    vision = None
    if inner.vision is not None:  # gathered over TP when sharded; over PP below (only the first stage has it)
        vision = {k: t.cpu() for k, t in gather_full_state(inner.vision, dataclasses.replace(groups, pp=None)).items()}
    if groups.size(groups.pp) > 1:  # the first stage's tower, to every stage
        shared = [vision]
        dist.broadcast_object_list(shared, src=dist.get_global_rank(groups.pp, 0), group=groups.pp)
        vision = shared[0]
    out.update(hf_vision_items(vision.items(), inner.cfg.vision))
    return out
