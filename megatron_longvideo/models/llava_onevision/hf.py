"""LLaVA-OneVision's Hugging Face configs and ours, both ways.

Our ``VLMConfig`` is a ``LlavaOnevisionConfig`` with a ``SiglipVisionConfig`` tower and a Qwen2 text model
(:func:`~megatron_longvideo.checkpoint.hf_config.qwen2_config`). What LLaVA-OneVision fixes and we must match
(and so refuse to export otherwise):

* features of the **last** ViT layer before the post-layernorm: ``vision_feature_layer=-1``,
  ``vision_feature_select_strategy="full"`` (the exported ``post_layernorm`` is never used);
* projector Linear - exact GELU - Linear with biases (``projector_hidden_act="gelu"``);
* video pooling is not a config field in transformers: LLaVA-OneVision always bilinear-resizes each
  frame's g x g grid to ceil(g/2) x ceil(g/2) after the projector and appends one ``image_newline``
  per video. Only our ``pooling="bilinear", newline=True`` does the same; ``"none"`` and VILA's
  ``"merge2x2"`` (channel concatenation before the projector) have no LLaVA-OneVision equivalent.
* ``vision_aspect_ratio`` and ``image_grid_pinpoints`` only matter for still images (anyres tiling);
  they are written as LLaVA-OneVision's defaults scaled to our image size.
"""

from __future__ import annotations

from typing import Optional

from megatron_longvideo.checkpoint.hf_config import _get, llm_config_from_hf, qwen2_config
from megatron_longvideo.models.llava_onevision.model import VLMConfig
from megatron_longvideo.models.llava_onevision.vision import VisionConfig

__all__ = ["siglip_vision_config", "llava_onevision_config", "vision_config_from_hf", "vlm_config_from_hf",
           "grid_pinpoints", "check_exportable_vision"]


def check_exportable_vision(vision: VisionConfig) -> None:
    if vision.pooling != "bilinear":
        raise ValueError(
            f"vision.pooling={vision.pooling!r} has no LLaVA-OneVision equivalent: its video path always pools "
            f"bilinearly to ceil(g/2) x ceil(g/2) after the projector (our pooling='bilinear')"
            + ("; 'merge2x2' concatenates 2x2 neighbours before the projector (VILA), which LLaVA-OneVision cannot express"
               if vision.pooling == "merge2x2" else "")
        )
    if not vision.newline:
        raise ValueError("vision.newline=False has no LLaVA-OneVision equivalent: it appends one image_newline per video")


def siglip_vision_config(vision: VisionConfig):
    """``SiglipVisionConfig`` of our ViT (no pooling head; the post-layernorm exists but is unused)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.ffn_hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_attention_heads,
        num_channels=3,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=vision.norm_eps,
        attention_dropout=0.0,
        vision_use_head=False,
    )


def grid_pinpoints(image_size: int) -> list[list[int]]:
    # LLaVA-OneVision's default anyres grid (1..6 tiles per side at 384 px), scaled to our tile size
    return [[h * image_size, w * image_size] for h in range(1, 7) for w in range(1, 7)]


def llava_onevision_config(cfg: VLMConfig, *, image_token_id: Optional[int] = None, **text_extra):
    """``LlavaOnevisionConfig`` for our VLM. ``image_token_id`` defaults to ``video_token_id - 1``
    (LLaVA-OneVision's convention, 151646 / 151647); it is only used for still images."""
    from transformers import LlavaOnevisionConfig

    check_exportable_vision(cfg.vision)
    if image_token_id is None:
        image_token_id = cfg.video_token_id - 1 if cfg.video_token_id > 0 else cfg.video_token_id + 1
    if image_token_id == cfg.video_token_id:
        raise ValueError(f"image_token_id must differ from video_token_id={cfg.video_token_id}")
    return LlavaOnevisionConfig(
        vision_config=siglip_vision_config(cfg.vision),
        text_config=qwen2_config(cfg.llm, **text_extra),
        image_token_index=image_token_id,
        video_token_index=cfg.video_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=cfg.llm.tie_word_embeddings,
        imagegrid_pinpoints=grid_pinpoints(cfg.vision.image_size),
        vision_aspect_ratio="anyres_max_9",
    )


def vision_config_from_hf(config, **overrides) -> VisionConfig:
    """Our ``VisionConfig`` (bilinear pooling, newline on) from a ``SiglipVisionConfig`` (or its dict)."""
    model_type = _get(config, "model_type")
    if model_type not in ("siglip_vision_model", "siglip"):
        raise ValueError(f"expected a SigLIP vision config (model_type 'siglip_vision_model'), got {model_type!r}")
    if _get(config, "hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"vision hidden_act={_get(config, 'hidden_act')!r} is not supported (SigLIP: 'gelu_pytorch_tanh')")
    if _get(config, "num_channels", 3) != 3:
        raise ValueError(f"vision num_channels={_get(config, 'num_channels')} is not supported (RGB frames: 3)")
    kwargs = dict(
        image_size=_get(config, "image_size"),
        patch_size=_get(config, "patch_size"),
        hidden_size=_get(config, "hidden_size"),
        num_layers=_get(config, "num_hidden_layers"),
        num_attention_heads=_get(config, "num_attention_heads"),
        ffn_hidden_size=_get(config, "intermediate_size"),
        norm_eps=_get(config, "layer_norm_eps", 1e-6),
        pooling="bilinear",
        newline=True,
    )
    kwargs.update(overrides)
    return VisionConfig(**kwargs)


def vlm_config_from_hf(config, *, llm_overrides: Optional[dict] = None, vision_overrides: Optional[dict] = None) -> VLMConfig:
    """Our ``VLMConfig`` from a ``LlavaOnevisionConfig``; refuses settings our video path does not follow."""
    model_type = _get(config, "model_type")
    if model_type != "llava_onevision":
        raise ValueError(f"expected a LLaVA-OneVision config (model_type 'llava_onevision'), got {model_type!r}")
    vision = _get(config, "vision_config")
    layer = _get(config, "vision_feature_layer", -1)
    if layer not in (-1, _get(vision, "num_hidden_layers")):
        raise ValueError(f"vision_feature_layer={layer!r} is not supported: our encoder takes the last ViT layer (-1)")
    strategy = _get(config, "vision_feature_select_strategy", "full")
    if strategy != "full":
        raise ValueError(f"vision_feature_select_strategy={strategy!r} is not supported: SigLIP has no class token ('full')")
    if _get(config, "projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"projector_hidden_act={_get(config, 'projector_hidden_act')!r} is not supported (exact 'gelu')")
    if not _get(config, "multimodal_projector_bias", True):
        raise ValueError("multimodal_projector_bias=False is not supported (our projector has biases)")
    text = _get(config, "text_config")
    llm_overrides = dict(llm_overrides or {})
    tied = bool(_get(config, "tie_word_embeddings", False) or _get(text, "tie_word_embeddings", False))
    llm_overrides.setdefault("tie_word_embeddings", tied)
    return VLMConfig(
        llm=llm_config_from_hf(text, **llm_overrides),
        vision=vision_config_from_hf(vision, **(vision_overrides or {})),
        video_token_id=_get(config, "video_token_index", _get(config, "video_token_id")),
    )
