"""Hugging Face config objects for our models, and back.

Our ``LLMConfig`` is a ``Qwen2Config``. The families' own configs are converted in their folders
(:mod:`megatron_longvideo.models.llava_onevision.hf`, :mod:`megatron_longvideo.models.qwen2_5_vl.hf`,
:mod:`megatron_longvideo.models.qwen2_audio.hf`); :func:`hf_config` and :func:`config_from_hf` dispatch to
them.

Supported transformers versions: :data:`SUPPORTED_TRANSFORMERS` (4.57 up to, not including, 6).
"""

from __future__ import annotations

from typing import Optional

from megatron_longvideo.models.llm import LLMConfig

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "check_transformers_version",
    "qwen2_config",
    "hf_config",
    "llm_config_from_hf",
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


def hf_config(cfg, **kwargs):
    """The HF config of ``cfg``: Qwen2 for an LLM, LLaVA-OneVision for a LLaVA-OneVision VLM, Qwen2-Audio
    for a Qwen2-Audio (``kwargs`` go to the text config)."""
    from megatron_longvideo.models.llava_onevision.hf import llava_onevision_config
    from megatron_longvideo.models.llava_onevision.model import VLMConfig
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig

    if isinstance(cfg, VLMConfig):
        return llava_onevision_config(cfg, **kwargs)
    if isinstance(cfg, Qwen2AudioConfig):
        from megatron_longvideo.models.qwen2_audio.hf import hf_config as qwen2_audio_config

        return qwen2_audio_config(cfg, **kwargs)
    if isinstance(cfg, LLMConfig):
        return qwen2_config(cfg, **kwargs)
    raise TypeError(f"expected an LLMConfig, a VLMConfig or a Qwen2AudioConfig, got {type(cfg).__name__}")


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


def config_from_hf(config):
    """Our config of a Qwen2, LLaVA-OneVision, Qwen2.5-VL or Qwen2-Audio HF config (object or ``config.json``
    dict)."""
    model_type = _get(config, "model_type")
    if model_type == "llava_onevision":
        from megatron_longvideo.models.llava_onevision.hf import vlm_config_from_hf

        return vlm_config_from_hf(config)
    if model_type == "qwen2":
        return llm_config_from_hf(config)
    if model_type == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.model import qwen25vl_config_from_hf

        return qwen25vl_config_from_hf(config)
    if model_type == "qwen2_audio":
        from megatron_longvideo.models.qwen2_audio.model import qwen2_audio_config_from_hf

        return qwen2_audio_config_from_hf(config)
    raise ValueError(f"model_type {model_type!r} is not supported: expected 'qwen2' (Qwen2ForCausalLM), "
                     f"'llava_onevision' (LlavaOnevisionForConditionalGeneration), 'qwen2_5_vl' "
                     f"(Qwen2_5_VLForConditionalGeneration) or 'qwen2_audio' (Qwen2AudioForConditionalGeneration)")
