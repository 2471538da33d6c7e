"""Models built from megatron-core parts, one folder per family over shared parts.

Shared: the Qwen2-style LLM on GPTModel (``llm``), its norm (``norm``) and explicit-position rotary
embedding (``rotary``, multimodal RoPE included), parallel frame encoding (``encode``), the merge of video
tokens into text (``merge``), the video embedding cache (``video_cache``), sequence-parallel prefill
(``prefill``) and the module and forward both families share (``vlm``).

Families: ``llava_onevision/`` (SigLIP + MLP projector + Qwen2) and ``qwen2_5_vl/`` (window-attention
tower, multimodal RoPE), each with its config and model, tower, HF maps and inputs (chat tokens,
processor configs). :func:`build_model` builds either from its config.
"""

from __future__ import annotations

__all__ = ["FAMILIES", "build_model", "family_of", "special_tokens", "video_token_counter"]

FAMILIES = ("llava_onevision", "qwen2_5_vl")


def family_of(cfg) -> str:
    """The family name of a model config."""
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig

    if isinstance(cfg, Qwen25VLConfig):
        return "qwen2_5_vl"
    if isinstance(cfg, VLMConfig):
        return "llava_onevision"
    raise TypeError(f"not a video-language model config: {type(cfg).__name__}")


def special_tokens(family: str):
    """The chat tokens of ``family`` (its checkpoints' tokenizers hold them): LLaVA-OneVision's ``<video>``,
    Qwen2.5-VL's ``<|vision_start|><|video_pad|><|vision_end|>``."""
    if family not in FAMILIES:
        raise ValueError(f"model family: must be one of {FAMILIES}, got {family!r}")
    if family == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.inputs import SPECIAL_TOKENS

        return SPECIAL_TOKENS
    from megatron_longvideo.models.llava_onevision.inputs import SPECIAL_TOKENS

    return SPECIAL_TOKENS


def build_model(cfg, groups, *, seed: int = 0, **kwargs):
    """This rank's video-language model for ``cfg`` (a ``VLMConfig`` or a ``Qwen25VLConfig``)."""
    if family_of(cfg) == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl

        return build_qwen25vl(cfg, groups, seed=seed, **kwargs)
    from megatron_longvideo.models.llava_onevision.model import build_vlm

    return build_vlm(cfg, groups, seed=seed, **kwargs)


def video_token_counter(cfg, image_size: int):
    """``num_frames -> placeholder tokens`` of a video whose frames are ``image_size`` squares."""
    if family_of(cfg) == "qwen2_5_vl":
        return lambda num_frames: cfg.num_video_tokens(num_frames, image_size, image_size)
    return cfg.vision.num_video_tokens
