"""Models built from megatron-core parts, one folder per family over shared parts.

Shared: the Qwen2-style LLM on GPTModel (``llm``), its norm (``norm``) and explicit-position rotary
embedding (``rotary``, multimodal RoPE included), parallel frame encoding (``encode``), the merge of video
tokens into text (``merge``), the video embedding cache (``video_cache``), sequence-parallel prefill
(``prefill``) and the module and forward both families share (``vlm``).

Families: ``llava_onevision/`` (SigLIP + MLP projector + Qwen2), ``qwen2_5_vl/`` (window-attention
tower, multimodal RoPE) and ``qwen2_audio/`` (Whisper-style audio tower + linear projector + Qwen2; its
units are 30 s log-mel windows), each with its config and model, tower, HF maps and inputs (chat tokens,
processor configs). :func:`build_model` builds any of them from its config.
"""

from __future__ import annotations

__all__ = ["FAMILIES", "build_model", "family_of", "special_tokens", "tower_config", "replace_tower",
           "video_token_counter", "audio_token_counter"]

FAMILIES = ("llava_onevision", "qwen2_5_vl", "qwen2_audio")


def family_of(cfg) -> str:
    """The family name of a model config."""
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig

    if isinstance(cfg, Qwen2AudioConfig):
        return "qwen2_audio"
    if isinstance(cfg, Qwen25VLConfig):
        return "qwen2_5_vl"
    if isinstance(cfg, VLMConfig):
        return "llava_onevision"
    raise TypeError(f"not a video- or audio-language model config: {type(cfg).__name__}")


def tower_config(cfg):
    """The media tower's config of a model config: ``cfg.vision`` (SigLIP, Qwen2.5-VL's ViT) or ``cfg.audio``
    (Qwen2-Audio's encoder). Each has ``max_frames`` (the audio tower's counts windows) and ``freeze``."""
    return cfg.audio if family_of(cfg) == "qwen2_audio" else cfg.vision


def replace_tower(cfg, **changes):
    """``cfg`` with its media tower's config (:func:`tower_config`) replaced by ``changes``."""
    import dataclasses

    field = "audio" if family_of(cfg) == "qwen2_audio" else "vision"
    return dataclasses.replace(cfg, **{field: dataclasses.replace(getattr(cfg, field), **changes)})


def special_tokens(family: str):
    """The chat tokens of ``family`` (its checkpoints' tokenizers hold them): LLaVA-OneVision's ``<video>``,
    Qwen2.5-VL's ``<|vision_start|><|video_pad|><|vision_end|>``, Qwen2-Audio's
    ``<|audio_bos|><|AUDIO|><|audio_eos|>`` (the placeholder in the ``video`` field)."""
    if family not in FAMILIES:
        raise ValueError(f"model family: must be one of {FAMILIES}, got {family!r}")
    if family == "qwen2_audio":
        from megatron_longvideo.models.qwen2_audio.inputs import SPECIAL_TOKENS

        return SPECIAL_TOKENS
    if family == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.inputs import SPECIAL_TOKENS

        return SPECIAL_TOKENS
    from megatron_longvideo.models.llava_onevision.inputs import SPECIAL_TOKENS

    return SPECIAL_TOKENS


def build_model(cfg, groups, *, seed: int = 0, **kwargs):
    """This rank's model for ``cfg`` (a ``VLMConfig``, a ``Qwen25VLConfig`` or a ``Qwen2AudioConfig``)."""
    family = family_of(cfg)
    if family == "qwen2_audio":
        from megatron_longvideo.models.qwen2_audio.model import build_qwen2_audio

        return build_qwen2_audio(cfg, groups, seed=seed, **kwargs)
    if family == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl

        return build_qwen25vl(cfg, groups, seed=seed, **kwargs)
    from megatron_longvideo.models.llava_onevision.model import build_vlm

    return build_vlm(cfg, groups, seed=seed, **kwargs)


def video_token_counter(cfg, image_size: int):
    """``num_frames -> placeholder tokens`` of a video whose frames are ``image_size`` squares."""
    if family_of(cfg) == "qwen2_audio":
        raise ValueError("video_token_counter: a Qwen2-Audio model takes audio, not video (audio_token_counter)")
    if family_of(cfg) == "qwen2_5_vl":
        return lambda num_frames: cfg.num_video_tokens(num_frames, image_size, image_size)
    return cfg.vision.num_video_tokens


def audio_token_counter(cfg):
    """``num_mel_frames -> placeholder tokens`` of an audio (its real log-mel frames, 10 ms each, cut into
    30 s windows) for a Qwen2-Audio config."""
    if family_of(cfg) != "qwen2_audio":
        raise ValueError(f"audio_token_counter: the {family_of(cfg)} family takes no audio")
    return cfg.num_audio_tokens
