"""Hugging Face side of the Qwen2.5-VL family (``Qwen2_5_VLForConditionalGeneration``), language model part.

Its text model is Qwen2 (q/k/v biases, RMSNorm, SwiGLU) with multimodal RoPE, so our ``LLMConfig`` with
``mrope_section`` and the Qwen2 weight map describe it; only the names differ. transformers 5 names the
language model ``model.language_model.*`` (in memory and on disk), 4.x checkpoints ``model.*``; the
vision tower is ``model.visual.*`` / ``visual.*`` (:func:`vision_items` maps it into
:class:`~megatron_longvideo.models.qwen2_5_vl.vision.QwenVisionTower`).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from megatron_longvideo.models.llm import LLMConfig

__all__ = ["llm_config_from_hf", "language_model_items", "vision_config_from_hf", "vision_items", "hf_vision_items",
           "hf_language_model_items", "megatron_items", "hf_items", "hf_config", "canonical_hf_name"]


def _get(config, name, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def llm_config_from_hf(config, **overrides) -> LLMConfig:
    """Our ``LLMConfig`` (with ``mrope_section``) of a Qwen2.5-VL config or its ``text_config`` (object or dict)."""
    text = _get(config, "text_config") or config
    model_type = _get(text, "model_type")
    if model_type not in ("qwen2_5_vl_text", "qwen2_5_vl"):
        raise ValueError(f"expected a Qwen2.5-VL text config (model_type 'qwen2_5_vl_text'), got {model_type!r}")
    rope = _get(text, "rope_parameters") or _get(text, "rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"rope type {rope_type!r} is not supported (Qwen2.5-VL uses plain multimodal RoPE)")
    section = rope.get("mrope_section")
    if section is None:
        raise ValueError("the text config has no mrope_section (rope_parameters / rope_scaling): not a Qwen2.5-VL config")
    hidden, heads = _get(text, "hidden_size"), _get(text, "num_attention_heads")
    kwargs = dict(
        vocab_size=_get(text, "vocab_size"), hidden_size=hidden, num_layers=_get(text, "num_hidden_layers"),
        num_attention_heads=heads, num_query_groups=_get(text, "num_key_value_heads") or heads,
        ffn_hidden_size=_get(text, "intermediate_size"), max_position_embeddings=_get(text, "max_position_embeddings"),
        rotary_base=float(rope.get("rope_theta", _get(text, "rope_theta", 1e6))), norm_eps=_get(text, "rms_norm_eps"),
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False) or _get(text, "tie_word_embeddings", False)),
        init_std=_get(text, "initializer_range", 0.02), mrope_section=tuple(section),
    )
    kwargs.update(overrides)
    return LLMConfig(**kwargs)


_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def language_model_items(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF ``(name, tensor)`` of a Qwen2.5-VL -> the Qwen2 names of its language model (``model.*``,
    ``lm_head.weight``), for :class:`~megatron_longvideo.checkpoint.hf_map.WeightMap` of the
    ``LLMConfig``; vision tensors are passed over."""
    for name, t in items:
        if name.startswith(("model.visual.", "visual.")):
            continue
        if name in ("lm_head.weight", "language_model.lm_head.weight"):
            yield "lm_head.weight", t
            continue
        for prefix in _TEXT_PREFIXES:
            if name.startswith(prefix):
                yield "model." + name[len(prefix):], t
                break
        else:
            raise ValueError(f"{name}: not a tensor of a Qwen2_5_VLForConditionalGeneration's language model")


def vision_config_from_hf(config, **overrides):
    """Our :class:`~megatron_longvideo.models.qwen2_5_vl.vision.QwenVisionConfig` of a Qwen2.5-VL config
    or its ``vision_config``."""
    from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

    v = _get(config, "vision_config") or config
    if _get(v, "hidden_act", "silu") != "silu":
        raise ValueError(f"vision hidden_act={_get(v, 'hidden_act')!r} is not supported (Qwen2.5-VL: 'silu')")
    if _get(v, "in_channels", _get(v, "in_chans", 3)) != 3:
        raise ValueError("vision in_channels must be 3 (RGB frames)")
    kwargs = dict(depth=_get(v, "depth"), hidden_size=_get(v, "hidden_size"), intermediate_size=_get(v, "intermediate_size"),
                  num_heads=_get(v, "num_heads"), out_hidden_size=_get(v, "out_hidden_size"), patch_size=_get(v, "patch_size"),
                  temporal_patch_size=_get(v, "temporal_patch_size"), spatial_merge_size=_get(v, "spatial_merge_size"),
                  window_size=_get(v, "window_size"), fullatt_block_indexes=tuple(_get(v, "fullatt_block_indexes")),
                  tokens_per_second=float(_get(v, "tokens_per_second", 2)))
    kwargs.update(overrides)
    return QwenVisionConfig(**kwargs)


# transformers' name -> ours, for the tower tensors that are only renamed (the rest change layout)
_LAYER_RENAMES = {"norm1.weight": "input_layernorm.weight", "norm2.weight": "pre_mlp_layernorm.weight",
                  "attn.proj.weight": "self_attention.linear_proj.weight", "attn.proj.bias": "self_attention.linear_proj.bias",
                  "mlp.down_proj.weight": "mlp.linear_fc2.weight", "mlp.down_proj.bias": "mlp.linear_fc2.bias"}
_TOP_RENAMES = {"patch_embed.proj.weight": "patch_embed.weight", "merger.ln_q.weight": "merger_norm.weight",
                "merger.mlp.0.weight": "merger.encoder.linear_fc1.weight", "merger.mlp.0.bias": "merger.encoder.linear_fc1.bias",
                "merger.mlp.2.weight": "merger.encoder.linear_fc2.weight", "merger.mlp.2.bias": "merger.encoder.linear_fc2.bias"}


def vision_items(items: Iterable[tuple[str, torch.Tensor]], cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """HF ``(name, tensor)`` of a Qwen2.5-VL (any of transformers' namings) -> the state-dict names of
    :class:`~megatron_longvideo.models.qwen2_5_vl.vision.QwenVisionTower`; language-model tensors are
    passed over. q/k/v are interleaved per head (megatron's layout), gate/up concatenated."""
    from megatron_longvideo.checkpoint.hf_map import merge_qkv

    renames, tops = _LAYER_RENAMES, _TOP_RENAMES
    gate_up: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in items:
        for prefix in ("model.visual.", "visual."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        else:
            continue
        if name in tops:
            yield tops[name], t.reshape(t.shape[0], -1) if name == "patch_embed.proj.weight" else t
            continue
        _, index, rest = name.split(".", 2)  # blocks.{i}.rest
        mg = f"layers.{index}."
        if rest in renames:
            yield mg + renames[rest], t
        elif rest in ("attn.qkv.weight", "attn.qkv.bias"):
            q, k, v = t.chunk(3, dim=0)
            yield mg + "self_attention.linear_qkv." + rest.rsplit(".", 1)[1], merge_qkv(q, k, v, cfg.num_heads, cfg.num_heads)
        elif rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            kind = rest.rsplit(".", 1)[1]
            parts = gate_up.setdefault(mg + kind, {})
            parts["gate" if "gate_proj" in rest else "up"] = t
            if len(parts) == 2:
                yield mg + "mlp.linear_fc1." + kind, torch.cat([parts["gate"], parts["up"]], dim=0)
        else:
            raise ValueError(f"visual.{name}: not a tensor of a Qwen2.5-VL vision tower")


def hf_vision_items(state: Iterable[tuple[str, torch.Tensor]], cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """Inverse of :func:`vision_items`: tower state-dict ``(name, tensor)`` -> transformers 5's
    ``model.visual.*`` names and layouts."""
    from megatron_longvideo.checkpoint.hf_map import split_qkv

    tops = {ours: hf for hf, ours in _TOP_RENAMES.items()}
    renames = {ours: hf for hf, ours in _LAYER_RENAMES.items()}
    p, tp = cfg.patch_size, cfg.temporal_patch_size
    for name, t in state:
        if name in tops:
            yield "model.visual." + tops[name], t.reshape(t.shape[0], 3, tp, p, p) if name == "patch_embed.weight" else t
            continue
        _, index, rest = name.split(".", 2)  # layers.{i}.rest
        hf = f"model.visual.blocks.{index}."
        if rest in renames:
            yield hf + renames[rest], t
        elif rest.startswith("self_attention.linear_qkv."):
            yield hf + "attn.qkv." + rest.rsplit(".", 1)[1], torch.cat(split_qkv(t, cfg.num_heads, cfg.num_heads))
        elif rest.startswith("mlp.linear_fc1."):
            kind = rest.rsplit(".", 1)[1]
            gate, up = t.chunk(2, dim=0)
            yield hf + "mlp.gate_proj." + kind, gate.contiguous()
            yield hf + "mlp.up_proj." + kind, up.contiguous()
        else:
            raise ValueError(f"{name}: not a tensor of our Qwen2.5-VL vision tower")


def hf_language_model_items(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Inverse of :func:`language_model_items`: Qwen2 names -> transformers 5's Qwen2.5-VL names."""
    for name, t in items:
        yield ("lm_head.weight" if name == "lm_head.weight" else "model.language_model." + name[len("model."):]), t


def megatron_items(read, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """Full-state ``(name, tensor)`` of a Qwen2.5-VL checkpoint, streamed in two passes over ``read()``
    (an iterator factory over its HF tensors): the language model, then the tower."""
    from megatron_longvideo.checkpoint.hf_map import WeightMap

    yield from WeightMap(cfg.llm, megatron_prefix="llm.").to_megatron(language_model_items(read()))
    for name, t in vision_items(read(), cfg.vision):
        yield "vision." + name, t


def hf_items(state, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """Inverse of :func:`megatron_items`: ``state`` a mapping or an iterator factory of full-state pairs."""
    from megatron_longvideo.checkpoint.hf_map import WeightMap

    def read():
        return iter(state.items()) if hasattr(state, "items") else iter(state())

    yield from hf_language_model_items(WeightMap(cfg.llm, megatron_prefix="llm.", ignore_prefixes=("vision.",)).to_hf(read()))
    vision = ((k[len("vision."):], v) for k, v in read() if k.startswith("vision."))
    yield from hf_vision_items(vision, cfg.vision)


def hf_config(cfg, **text_extra):
    """``Qwen2_5_VLConfig`` of our Qwen2.5-VL config."""
    from transformers import Qwen2_5_VLConfig

    llm, v = cfg.llm, cfg.vision
    text = dict(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.ffn_hidden_size,
                num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_attention_heads,
                num_key_value_heads=llm.num_query_groups, max_position_embeddings=llm.max_position_embeddings,
                rms_norm_eps=llm.norm_eps, tie_word_embeddings=llm.tie_word_embeddings, initializer_range=llm.init_std,
                rope_parameters={"rope_type": "default", "rope_theta": llm.rotary_base, "mrope_section": list(llm.mrope_section)},
                **text_extra)
    vision = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads,
                  out_hidden_size=v.out_hidden_size, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                  spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                  fullatt_block_indexes=list(v.fullatt_block_indexes),
                  # transformers 5 types it int (the public configs write 2); a fraction stays a float
                  tokens_per_second=int(v.tokens_per_second) if float(v.tokens_per_second).is_integer()
                  else v.tokens_per_second)
    extra = {} if cfg.image_token_id is None else {"image_token_id": cfg.image_token_id}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, video_token_id=cfg.video_token_id,
                            tie_word_embeddings=llm.tie_word_embeddings, **extra)


def canonical_hf_name(name: str) -> str:
    """A Qwen2.5-VL tensor name in transformers 5's spelling (4.x checkpoints: ``model.*``, ``visual.*``)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + name[len("model."):]
    return name
