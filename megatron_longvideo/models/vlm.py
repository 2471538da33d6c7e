"""What the video-language model families share: the module (:class:`VisionLanguageModel`: the LLM, a
vision tower on the first pipeline stage, megatron's module interface), the text embeddings the video
tokens are merged into, and :func:`vlm_forward`, which runs a micro-batch through a model of either
family (LLaVA-OneVision: :mod:`~megatron_longvideo.models.llava_onevision`; Qwen2.5-VL:
:mod:`~megatron_longvideo.models.qwen2_5_vl`).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_longvideo.models.llm import build_llm, unwrap
from megatron_longvideo.parallel.groups import ParallelGroups

__all__ = ["VisionLanguageModel", "vlm_forward", "text_embeddings"]


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
        self.tp_group = groups.tp  # a replicated vision tower's replica ids (see sharded_state_dict)
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
            # A tower with a sharded_state_dict of its own (Qwen2.5-VL) decides for itself; a replicated one
            # (SigLIP) is one main replica over TP and DP x CP. Without the TP group megatron gives every
            # TP rank replica_id 0 and the save fails its access check.
            sd.update(sharded_state_dict_default(self.vision, f"{prefix}vision.", sharded_offsets, metadata,
                                                 tp_group=self.tp_group))
        return sd


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


def vlm_forward(model, groups: ParallelGroups, **kwargs):
    """One micro-batch through the (possibly DDP-wrapped) model of either family: a LLaVA-OneVision model
    goes to :func:`~megatron_longvideo.models.llava_onevision.model.llava_vlm_forward` (its arguments:
    ``input_ids``, ``videos`` or ``video_embeds``, ``labels``, ``cache``, ``cache_keys``, ``return_merged``),
    a Qwen2.5-VL model to :func:`~megatron_longvideo.models.qwen2_5_vl.model.qwen_vlm_forward` (the same,
    without ``video_embeds``), a Qwen2-Audio model to
    :func:`~megatron_longvideo.models.qwen2_audio.model.qwen2_audio_forward` (``videos`` are its audios)."""
    from megatron_longvideo.models.llava_onevision.model import llava_vlm_forward
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLModel, qwen_vlm_forward
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioModel, qwen2_audio_forward

    if isinstance(unwrap(model), Qwen2AudioModel):  # its media inputs are audios (packed log-mel windows)
        kwargs["audios"] = kwargs.pop("videos", None)
        kwargs["audio_embeds"] = kwargs.pop("video_embeds", None)
        kwargs.pop("seconds_per_frame", None)
        return qwen2_audio_forward(model, groups, **kwargs)
    if isinstance(unwrap(model), Qwen25VLModel):
        if kwargs.pop("video_embeds", None) is not None:
            raise ValueError("video_embeds: not supported for Qwen2.5-VL yet; pass videos")
        return qwen_vlm_forward(model, groups, **kwargs)
    return llava_vlm_forward(model, groups, **kwargs)
