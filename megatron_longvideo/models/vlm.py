"""The video-language model: a Qwen2-style GPTModel plus the replicated vision encoder.

One ``MegatronModule`` so that megatron's DDP, optimizer and checkpointing see every parameter:
``llm`` (GPTModel, this pipeline stage's layers) and, on the first stage, ``vision``
(:class:`VisionEncoder`). :func:`vlm_forward` runs one micro-batch: parallel encoding of its videos
(MR-SP stage 1, through the embedding cache), merge into the text embeddings, sharding over the
CP ranks, and the LLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_longvideo.models.encode import encode_videos
from megatron_longvideo.models.llm import LLMConfig, build_llm, lm_forward, unwrap
from megatron_longvideo.models.merge import merge_video_tokens
from megatron_longvideo.models.vision import VisionConfig, build_vision_encoder
from megatron_longvideo.parallel.groups import ParallelGroups
from megatron_longvideo.platform.device import device_of

__all__ = ["VLMConfig", "VideoLanguageModel", "build_vlm", "vlm_forward", "text_embeddings"]


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


class VisionLanguageModel(MegatronModule):
    """What every family shares: the LLM (``llm``), a vision tower on the first pipeline stage only
    (``vision``, from ``build_tower(llm)``), megatron's module interface delegated to the LLM, and a
    sharded state dict with the replicated tower under ``vision.``."""

    def __init__(self, cfg, groups: ParallelGroups, build_tower, **llm_kwargs):
        self.cfg = cfg
        llm = build_llm(cfg.llm, groups, **llm_kwargs)
        super().__init__(config=llm.config)
        self.model_type = llm.model_type
        self.llm = llm
        self.tp_group = groups.tp  # the vision tower is replicated over it (see sharded_state_dict)
        self.vision = build_tower(llm) if llm.pre_process else None

    @property
    def sequence_context(self):
        return self.llm.sequence_context

    @property
    def pre_process(self) -> bool:
        return self.llm.pre_process

    @property
    def post_process(self) -> bool:
        return self.llm.post_process

    def set_input_tensor(self, input_tensor):
        self.llm.set_input_tensor(input_tensor)

    def forward(self, **kwargs):
        return self.llm(**kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        from megatron.core.transformer.utils import sharded_state_dict_default

        sd = self.llm.sharded_state_dict(prefix=f"{prefix}llm.", sharded_offsets=sharded_offsets, metadata=metadata)
        if self.vision is not None:
            # Replicated over TP and DP x CP: one main replica. Without the TP group megatron gives every
            # TP rank replica_id 0 and the save fails its access check.
            sd.update(sharded_state_dict_default(self.vision, f"{prefix}vision.", sharded_offsets, metadata,
                                                 tp_group=self.tp_group))
        return sd


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


@contextlib.contextmanager
def _full_sequence_embeddings(embedding):
    # Under Megatron SP the word embedding reduce-scatters its output along the sequence; the merge
    # needs whole sequences, so the plain all-reduce is used and the caller scatters after merging.
    saved = getattr(embedding, "reduce_scatter_embeddings", False)
    embedding.reduce_scatter_embeddings = False
    try:
        yield
    finally:
        embedding.reduce_scatter_embeddings = saved


def text_embeddings(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``[b, S]`` ids -> ``[b, S, h]`` word embeddings (all-reduced over TP, not SP-scattered)."""
    inner = unwrap(model)
    word = getattr(inner, "llm", inner).embedding.word_embeddings
    with _full_sequence_embeddings(word):
        return word(input_ids)


def vlm_forward(
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
    """One micro-batch through the (possibly DDP-wrapped) model.

    ``input_ids``/``labels`` ``[b, S]`` (S a multiple of 2 x CP, x TP under SP); ``videos[i]`` the frame
    tensors ``[T, 3, H, W]`` of sample i, or ``video_embeds[i]`` already-encoded embeddings. Returns
    what the LLM returns (per-token loss with labels), and the merged batch with ``return_merged``.
    A Qwen2.5-VL model goes to :func:`~megatron_longvideo.models.qwen2_5_vl.model.qwen_vlm_forward`.
    """
    from megatron.core import tensor_parallel

    from megatron_longvideo.training.lm_step import cp_shard

    inner = unwrap(model)
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLModel, qwen_vlm_forward

    if isinstance(inner, Qwen25VLModel):

        if video_embeds is not None:
            raise ValueError("video_embeds: not supported for Qwen2.5-VL yet; pass videos")
        return qwen_vlm_forward(model, groups, input_ids=input_ids, videos=videos, labels=labels, cache=cache,
                                cache_keys=cache_keys, return_merged=return_merged)
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
