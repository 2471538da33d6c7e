"""Hugging Face config objects for our models, and back.

Our ``LLMConfig`` is a ``Qwen2Config``; our ``VLMConfig`` is a ``LlavaOnevisionConfig`` with a
``SiglipVisionConfig`` tower and a Qwen2 text model. What LLaVA-OneVision fixes and we must match
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

Supported transformers versions: :data:`SUPPORTED_TRANSFORMERS` (4.57 up to, not including, 6).
"""

from __future__ import annotations

from typing import Optional, Union

from megatron_longvideo.models.llm import LLMConfig
from megatron_longvideo.models.vision import VisionConfig
from megatron_longvideo.models.vlm import VLMConfig

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "check_transformers_version",
    "qwen2_config",
    "siglip_vision_config",
    "llava_onevision_config",
    "hf_config",
    "llm_config_from_hf",
    "vision_config_from_hf",
    "vlm_config_from_hf",
    "config_from_hf",
]

SUPPORTED_TRANSFORMERS = (">=4.57", "<6")
"""transformers versions whose Qwen2 / SigLIP / LLaVA-OneVision classes match this map."""

_MIN, _MAX = "4.57", "6"


def check_transformers_version(version: Optional[str] = None) -> str:
    """Raise RuntimeError when ``version`` (default: the installed one) is outside the supported range."""
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    v = Version(version)
    if not (Version(_MIN) <= v < Version(_MAX)):
        raise RuntimeError(
            f"transformers {version} is not supported for Hugging Face conversion: supported range is "
            f"{', '.join(SUPPORTED_TRANSFORMERS)} (tested 5.23); install e.g. 'transformers>={_MIN},<{_MAX}'"
        )
    return version


def qwen2_config(llm: LLMConfig, **extra):
    """``Qwen2Config`` for our Qwen2-style decoder (``extra``: e.g. bos/eos/pad token ids)."""
    from transformers import Qwen2Config

    kwargs = dict(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_query_groups,
        hidden_act="silu",
        max_position_embeddings=llm.max_position_embeddings,
        initializer_range=llm.init_std,
        rms_norm_eps=llm.norm_eps,
        tie_word_embeddings=llm.tie_word_embeddings,
        rope_theta=llm.rotary_base,  # transformers 5 folds it into rope_parameters
        use_sliding_window=False,
        attention_dropout=0.0,
    )
    kwargs.update(extra)
    return Qwen2Config(**kwargs)


def _check_exportable_vision(vision: VisionConfig) -> None:
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


def _grid_pinpoints(image_size: int) -> list[list[int]]:
    # LLaVA-OneVision's default anyres grid (1..6 tiles per side at 384 px), scaled to our tile size
    return [[h * image_size, w * image_size] for h in range(1, 7) for w in range(1, 7)]


def llava_onevision_config(cfg: VLMConfig, *, image_token_id: Optional[int] = None, **text_extra):
    """``LlavaOnevisionConfig`` for our VLM. ``image_token_id`` defaults to ``video_token_id - 1``
    (LLaVA-OneVision's convention, 151646 / 151647); it is only used for still images."""
    from transformers import LlavaOnevisionConfig

    _check_exportable_vision(cfg.vision)
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
        image_grid_pinpoints=_grid_pinpoints(cfg.vision.image_size),
        vision_aspect_ratio="anyres_max_9",
    )


def hf_config(cfg: Union[LLMConfig, VLMConfig], **kwargs):
    """The HF config of ``cfg``: Qwen2 for an LLM, LLaVA-OneVision for a VLM."""
    if isinstance(cfg, VLMConfig):
        return llava_onevision_config(cfg, **kwargs)
    if isinstance(cfg, LLMConfig):
        return qwen2_config(cfg, **kwargs)
    raise TypeError(f"expected an LLMConfig or a VLMConfig, got {type(cfg).__name__}")


def _get(config, name, default=None):
    return getattr(config, name, default) if not isinstance(config, dict) else config.get(name, default)


def _rope_theta(config) -> float:
    params = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in (None, "default"):
        raise ValueError(f"rope type {rope_type!r} is not supported (our rotary embedding is plain RoPE)")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else _get(config, "rope_theta", 10000.0))


def llm_config_from_hf(config, **overrides) -> LLMConfig:
    """Our ``LLMConfig`` from a ``Qwen2Config`` (or its dict)."""
    model_type = _get(config, "model_type")
    if model_type != "qwen2":
        raise ValueError(f"expected a Qwen2 text config (model_type 'qwen2'), got model_type {model_type!r}")
    if _get(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={_get(config, 'hidden_act')!r} is not supported (Qwen2 uses 'silu')")
    if _get(config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported (our attention is full causal attention)")
    hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    head_dim = _get(config, "head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise ValueError(f"head_dim={head_dim} differs from hidden_size / num_attention_heads = {hidden // heads}")
    kwargs = dict(
        vocab_size=_get(config, "vocab_size"),
        hidden_size=hidden,
        num_layers=_get(config, "num_hidden_layers"),
        num_attention_heads=heads,
        num_query_groups=_get(config, "num_key_value_heads") or heads,
        ffn_hidden_size=_get(config, "intermediate_size"),
        max_position_embeddings=_get(config, "max_position_embeddings"),
        rotary_base=_rope_theta(config),
        norm_eps=_get(config, "rms_norm_eps"),
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
        init_std=_get(config, "initializer_range", 0.02),
    )
    kwargs.update(overrides)
    return LLMConfig(**kwargs)


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


def config_from_hf(config) -> Union[LLMConfig, VLMConfig]:
    """Our config of a Qwen2 or LLaVA-OneVision HF config (object or ``config.json`` dict)."""
    model_type = _get(config, "model_type")
    if model_type == "llava_onevision":
        return vlm_config_from_hf(config)
    if model_type == "qwen2":
        return llm_config_from_hf(config)
    if model_type == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.model import qwen25vl_config_from_hf

        return qwen25vl_config_from_hf(config)
    raise ValueError(f"model_type {model_type!r} is not supported: expected 'qwen2' (Qwen2ForCausalLM), "
                     f"'llava_onevision' (LlavaOnevisionForConditionalGeneration) or 'qwen2_5_vl' "
                     f"(Qwen2_5_VLForConditionalGeneration)")
