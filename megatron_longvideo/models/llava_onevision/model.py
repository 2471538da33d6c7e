"""The LLaVA-OneVision family: a Qwen2-style GPTModel plus the replicated SigLIP encoder and projector.

``VideoLanguageModel`` is one ``MegatronModule`` (the shared
:class:`~megatron_longvideo.models.vlm.VisionLanguageModel`) so that megatron's DDP, optimizer and
checkpointing see every parameter: ``llm`` (GPTModel, this pipeline stage's layers) and, on the first
stage, ``vision`` (:class:`~megatron_longvideo.models.llava_onevision.vision.VisionEncoder`).
:func:`llava_vlm_forward` runs one micro-batch: parallel encoding of its videos (MR-SP stage 1, through the
embedding cache), merge into the text embeddings, sharding over the CP ranks, and the LLM.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from megatron_longvideo.models.encode import encode_videos
from megatron_longvideo.models.llava_onevision.vision import VisionConfig, build_vision_encoder
from megatron_longvideo.models.llm import LLMConfig, lm_forward, unwrap
from megatron_longvideo.models.merge import merge_video_tokens
from megatron_longvideo.models.vlm import VisionLanguageModel, text_embeddings
from megatron_longvideo.parallel.groups import ParallelGroups
from megatron_longvideo.platform.device import device_of

__all__ = ["VLMConfig", "VideoLanguageModel", "build_vlm", "llava_vlm_forward"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class VLMConfig:
    """A video-language model: LLM, vision encoder and the video placeholder token."""

    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig.tiny)
    """The language model."""
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    """The vision tower, token pooling and projector."""
    video_token_id: int = 3
    """Placeholder token id that marks where a video's embeddings go."""

    def __post_init__(self):
        if not 0 <= self.video_token_id < self.llm.vocab_size:
            raise ValueError(f"video_token_id={self.video_token_id} is outside the vocabulary [0, {self.llm.vocab_size})")

    @classmethod
    def seven_b(cls) -> "VLMConfig":
        """A 7B-shaped model (Qwen2-7B + SigLIP-so400m at 384 px, bilinear pooling): described, not run on CPU."""
        return cls(llm=LLMConfig.qwen2_7b(), vision=VisionConfig.siglip_so400m(freeze=True), video_token_id=151647)


class VideoLanguageModel(VisionLanguageModel):
    """LLM + SigLIP vision encoder and projector (the LLaVA-OneVision family)."""

    def __init__(self, cfg: VLMConfig, groups: ParallelGroups, *, seed: int = 0, **llm_kwargs):
        def tower(llm):  # the tower takes the LLM's kernel, dtype and device
            return build_vision_encoder(cfg.vision, cfg.llm.hidden_size, groups, seed=seed + 1,
                                        attention_kernel=llm_kwargs.get("attention_kernel", "auto"),
                                        params_dtype=llm_kwargs.get("params_dtype", torch.float32),
                                        device=llm_kwargs.get("device"))

        super().__init__(cfg, groups, tower, **llm_kwargs)


def build_vlm(cfg: VLMConfig, groups: ParallelGroups, *, seed: int = 0, **llm_kwargs) -> VideoLanguageModel:
    """Build the model for this rank's pipeline stage (call ``torch.manual_seed`` first for the LLM)."""
    return VideoLanguageModel(cfg, groups, seed=seed, **llm_kwargs)


def llava_vlm_forward(
    model,
    groups: ParallelGroups,
    *,
    input_ids: torch.Tensor,
    videos: Optional[Sequence[Sequence[torch.Tensor]]] = None,
    video_embeds: Optional[Sequence[Sequence[torch.Tensor]]] = None,
    labels: Optional[torch.Tensor] = None,
    cache=None,
    cache_keys: Optional[Sequence[Sequence[str]]] = None,
    return_merged: bool = False,
):
    """One micro-batch through the (possibly DDP-wrapped) LLaVA-OneVision model.

    ``input_ids``/``labels`` ``[b, S]`` (S a multiple of 2 x CP, x TP under SP); ``videos[i]`` the frame
    tensors ``[T, 3, H, W]`` of sample i, or ``video_embeds[i]`` already-encoded embeddings. Returns
    what the LLM returns (per-token loss with labels), and the merged batch with ``return_merged``.
    """
    from megatron.core import tensor_parallel

    from megatron_longvideo.training.lm_step import cp_shard

    inner = unwrap(model)
    device = device_of(inner)  # collated batches arrive on the host: one copy of the ids per micro-batch
    input_ids = input_ids.to(device, non_blocking=True)
    labels = None if labels is None else labels.to(device, non_blocking=True)
    decoder_input, merged = None, None
    if inner.pre_process:
        if video_embeds is None:
            flat = [v for sample in (videos or []) for v in sample]
            keys = None if cache_keys is None else [k for sample in cache_keys for k in sample]
            encoded = encode_videos(inner.vision, flat, groups, cache=cache, keys=keys) if flat else []
            video_embeds, it = [], iter(encoded)
            for sample in videos or [[] for _ in range(input_ids.shape[0])]:
                video_embeds.append([next(it) for _ in sample])
        merged = merge_video_tokens(text_embeddings(model, input_ids), input_ids, video_embeds, inner.cfg.video_token_id)
        embeds = cp_shard(merged.embeds, groups, dim=1)  # [b, s_local, h]
        decoder_input = embeds.transpose(0, 1).contiguous()  # [s_local, b, h]
        if groups.config.sequence_parallel:
            decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input, group=groups.tp)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    out = lm_forward(
        model,
        decoder_input=decoder_input,
        position_ids=cp_shard(positions, groups),
        labels=None if labels is None else cp_shard(labels, groups),
    )
    return (out, merged) if return_merged else out
