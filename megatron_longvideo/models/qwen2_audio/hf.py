"""Hugging Face side of the Qwen2-Audio family (``Qwen2AudioForConditionalGeneration``): configs and
weights, both ways.

Names. transformers 5 holds the model in memory as ``model.audio_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*`` (a ``Qwen2Model``) and ``lm_head.weight``, and writes it to disk (as public
checkpoints have it) as ``audio_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*`` and
``language_model.lm_head.weight``. Both are read (:func:`canonical_hf_name`); :func:`hf_items` writes the
in-memory names, which ``load_state_dict`` and ``save_pretrained`` take.

Layouts. The LLM is Qwen2: :class:`~megatron_longvideo.checkpoint.hf_map.WeightMap` of the ``LLMConfig``
under ``llm.``. The tower (``vision.`` in our full state, :class:`~megatron_longvideo.models.qwen2_audio.audio.AudioTower`):
q / k / v are fused per head into ``linear_qkv`` (megatron's layout); transformers' ``k_proj`` has no
bias, so the fused bias takes zeros there on import and drops them on export (a key bias never changes
attention, and the tower keeps it at zero); the pre-LN norms, fc1 / fc2, the convolutions, the position
table, the final norm and the projector are renames.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from megatron_longvideo.models.qwen2_audio.audio import AudioConfig

__all__ = ["hf_config", "config_from_hf", "audio_config_from_hf", "canonical_hf_name", "audio_items",
           "hf_audio_items", "megatron_items", "hf_items"]

_TOWER, _PROJECTOR = "model.audio_tower.", "model.multi_modal_projector."
_TEXT, _HEAD = "model.language_model.", "lm_head.weight"
_ON_DISK = (("audio_tower.", _TOWER), ("multi_modal_projector.", _PROJECTOR), ("language_model.model.", _TEXT),
            ("language_model.lm_head.weight", _HEAD))


def _get(config, name, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


# -- configs ---------------------------------------------------------------------------------------------
def hf_config(cfg, **text_extra):
    """transformers' ``Qwen2AudioConfig`` of our :class:`~megatron_longvideo.models.qwen2_audio.model.Qwen2AudioConfig`
    (``text_extra``: e.g. bos / eos / pad token ids of the text config)."""
    from transformers import Qwen2AudioConfig

    from megatron_longvideo.checkpoint.hf_config import qwen2_config

    a = cfg.audio
    audio = dict(num_mel_bins=a.num_mel_bins, d_model=a.hidden_size, encoder_layers=a.num_layers,
                 encoder_attention_heads=a.num_attention_heads, encoder_ffn_dim=a.ffn_hidden_size,
                 max_source_positions=a.max_source_positions, activation_function="gelu", scale_embedding=False,
                 dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0)
    return Qwen2AudioConfig(audio_config=audio, text_config=qwen2_config(cfg.llm, **text_extra).to_dict(),
                            audio_token_index=cfg.audio_token_id)


def audio_config_from_hf(config, **overrides) -> AudioConfig:
    """Our :class:`~megatron_longvideo.models.qwen2_audio.audio.AudioConfig` of a ``Qwen2AudioConfig`` or its
    ``audio_config`` (object or dict)."""
    a = _get(config, "audio_config") or config
    if _get(a, "model_type", "qwen2_audio_encoder") != "qwen2_audio_encoder":
        raise ValueError(f"expected a Qwen2-Audio encoder config (model_type 'qwen2_audio_encoder'), got "
                         f"{_get(a, 'model_type')!r}")
    if _get(a, "activation_function", "gelu") != "gelu":
        raise ValueError(f"audio activation_function={_get(a, 'activation_function')!r} is not supported (exact 'gelu')")
    if _get(a, "attention_dropout", 0.0):
        raise ValueError(f"audio attention_dropout={_get(a, 'attention_dropout')} is not supported: the attention "
                         f"engine has no dropout on the probabilities")
    kwargs = dict(num_mel_bins=_get(a, "num_mel_bins"), hidden_size=_get(a, "d_model"),
                  num_layers=_get(a, "encoder_layers"), num_attention_heads=_get(a, "encoder_attention_heads"),
                  ffn_hidden_size=_get(a, "encoder_ffn_dim"),
                  max_source_positions=_get(a, "max_source_positions", 1500))
    kwargs.update(overrides)
    return AudioConfig(**kwargs)


def config_from_hf(config, *, audio_overrides=None, **llm_overrides):
    """Our ``Qwen2AudioConfig`` of transformers' one (object or ``config.json`` dict)."""
    from megatron_longvideo.checkpoint.hf_config import llm_config_from_hf
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig

    if _get(config, "model_type") != "qwen2_audio":
        raise ValueError(f"expected a Qwen2-Audio config (model_type 'qwen2_audio'), got {_get(config, 'model_type')!r}")
    text = _get(config, "text_config")
    tied = bool(_get(config, "tie_word_embeddings", False) or _get(text, "tie_word_embeddings", False))
    llm_overrides.setdefault("tie_word_embeddings", tied)
    token = _get(config, "audio_token_index", _get(config, "audio_token_id", 151646))
    return Qwen2AudioConfig(llm=llm_config_from_hf(text, **llm_overrides),
                            audio=audio_config_from_hf(config, **(audio_overrides or {})), audio_token_id=token)


# -- names -----------------------------------------------------------------------------------------------
def canonical_hf_name(name: str) -> str:
    """A Qwen2-Audio tensor name in transformers 5's in-memory spelling (on-disk names are mapped)."""
    if name.startswith(("model.", "lm_head.")):
        return name
    for old, new in _ON_DISK:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _tower_rules(cfg: AudioConfig) -> list[tuple[str, tuple[str, ...], tuple, tuple]]:
    """``(ours, HF names, our shape, HF shapes)`` of every tower tensor (HF names without ``model.``)."""
    d, f, m, p = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_mel_bins, cfg.max_source_positions
    t = "audio_tower."

    def plain(ours, hf, shape):
        return ours, (hf,), shape, (shape,)

    rules = [plain("conv1.weight", f"{t}conv1.weight", (d, m, 3)), plain("conv1.bias", f"{t}conv1.bias", (d,)),
             plain("conv2.weight", f"{t}conv2.weight", (d, d, 3)), plain("conv2.bias", f"{t}conv2.bias", (d,)),
             plain("position_embeddings", f"{t}embed_positions.weight", (p, d))]
    for i in range(cfg.num_layers):
        ours, hf = f"encoder.layers.{i}.", f"{t}layers.{i}."
        att = f"{hf}self_attn."
        rules += [(f"{ours}self_attention.linear_qkv.weight", tuple(f"{att}{x}_proj.weight" for x in "qkv"), (3 * d, d),
                   ((d, d),) * 3),
                  (f"{ours}self_attention.linear_qkv.bias", (f"{att}q_proj.bias", f"{att}v_proj.bias"), (3 * d,), ((d,),) * 2),
                  plain(f"{ours}self_attention.linear_proj.weight", f"{att}out_proj.weight", (d, d)),
                  plain(f"{ours}self_attention.linear_proj.bias", f"{att}out_proj.bias", (d,)),
                  plain(f"{ours}mlp.linear_fc1.weight", f"{hf}fc1.weight", (f, d)),
                  plain(f"{ours}mlp.linear_fc1.bias", f"{hf}fc1.bias", (f,)),
                  plain(f"{ours}mlp.linear_fc2.weight", f"{hf}fc2.weight", (d, f)),
                  plain(f"{ours}mlp.linear_fc2.bias", f"{hf}fc2.bias", (d,))]
        for kind in ("weight", "bias"):
            rules += [plain(f"{ours}input_layernorm.{kind}", f"{hf}self_attn_layer_norm.{kind}", (d,)),
                      plain(f"{ours}pre_mlp_layernorm.{kind}", f"{hf}final_layer_norm.{kind}", (d,))]
    rules += [plain(f"final_layernorm.{kind}", f"{t}layer_norm.{kind}", (d,)) for kind in ("weight", "bias")]
    return rules


def _projector_rules(cfg: AudioConfig, llm_hidden: int):
    d, h = cfg.hidden_size, llm_hidden
    return [("projector.encoder.weight", ("multi_modal_projector.linear.weight",), (h, d), ((h, d),)),
            ("projector.encoder.bias", ("multi_modal_projector.linear.bias",), (h,), ((h,),))]


def _check(name: str, t: torch.Tensor, shape: tuple) -> None:
    from megatron_longvideo.checkpoint.hf_map import CheckpointMismatchError

    if tuple(t.shape) != tuple(shape):
        raise CheckpointMismatchError(f"{name}: shape {tuple(t.shape)}, but the model config expects {tuple(shape)}")


def _merge(ours: str, parts: list[torch.Tensor], heads: int) -> torch.Tensor:
    from megatron_longvideo.checkpoint.hf_map import merge_qkv

    if ours.endswith("linear_qkv.weight"):
        return merge_qkv(*parts, heads, heads)
    if ours.endswith("linear_qkv.bias"):  # q, v: k_proj has no bias
        return merge_qkv(parts[0], torch.zeros_like(parts[0]), parts[1], heads, heads)
    return parts[0]


def _split(ours: str, t: torch.Tensor, heads: int) -> list[torch.Tensor]:
    from megatron_longvideo.checkpoint.hf_map import split_qkv

    if ours.endswith("linear_qkv.weight"):
        return list(split_qkv(t, heads, heads))
    if ours.endswith("linear_qkv.bias"):
        q, _, v = split_qkv(t, heads, heads)
        return [q, v]
    return [t]


# -- weights ---------------------------------------------------------------------------------------------
def audio_items(items: Iterable[tuple[str, torch.Tensor]], cfg, *,
                strict: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """HF ``(name, tensor)`` of a Qwen2-Audio (either naming) -> our tower's parameter names (``conv1.weight``,
    ``encoder.layers.{i}.…``, ``projector.encoder.weight``); language-model tensors are passed over.
    ``cfg``: our ``Qwen2AudioConfig``."""
    from megatron_longvideo.checkpoint.hf_map import CheckpointMismatchError

    rules = _tower_rules(cfg.audio) + _projector_rules(cfg.audio, cfg.llm.hidden_size)
    by_hf = {"model." + n: (r, i) for r in rules for i, n in enumerate(r[1])}
    pending: dict[str, dict[int, torch.Tensor]] = {}
    done = set()
    for raw, t in items:
        name = canonical_hf_name(raw)
        if not name.startswith((_TOWER, _PROJECTOR)):
            continue
        if name not in by_hf:
            raise CheckpointMismatchError(f"{raw}: not a tensor of a Qwen2-Audio tower of this config (unknown name)")
        (ours, hf_names, shape, hf_shapes), index = by_hf[name]
        _check(raw, t, hf_shapes[index])
        parts = pending.setdefault(ours, {})
        if index in parts or ours in done:
            raise CheckpointMismatchError(f"{raw}: appears twice in the checkpoint")
        parts[index] = t
        if len(parts) == len(hf_names):
            del pending[ours]
            done.add(ours)
            merged = _merge(ours, [parts[i] for i in range(len(hf_names))], cfg.audio.num_attention_heads)
            _check(ours, merged, shape)
            yield ours, merged
    missing = [r[0] for r in rules if r[0] not in done]
    if strict and missing:
        more = " ..." if len(missing) > 5 else ""
        raise CheckpointMismatchError(f"the checkpoint lacks tower tensors for {missing[:5]}{more}")


def hf_audio_items(items: Iterable[tuple[str, torch.Tensor]], cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """Inverse of :func:`audio_items`: our tower's ``(name, tensor)`` -> transformers 5's in-memory names
    (the zero key bias dropped)."""
    from megatron_longvideo.checkpoint.hf_map import CheckpointMismatchError

    rules = {r[0]: r for r in _tower_rules(cfg.audio) + _projector_rules(cfg.audio, cfg.llm.hidden_size)}
    for name, t in items:
        if name not in rules:
            raise CheckpointMismatchError(f"{name}: not a tensor of our Qwen2-Audio tower")
        ours, hf_names, shape, _ = rules[name]
        _check(name, t, shape)
        for hf_name, part in zip(hf_names, _split(ours, t, cfg.audio.num_attention_heads)):
            yield "model." + hf_name, part.contiguous()


def _text_items(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF names of the language model -> ``Qwen2ForCausalLM``'s (``model.*``, ``lm_head.weight``)."""
    for raw, t in items:
        name = canonical_hf_name(raw)
        if name == _HEAD:
            yield "lm_head.weight", t
        elif name.startswith(_TEXT):
            yield "model." + name[len(_TEXT):], t
        elif not name.startswith((_TOWER, _PROJECTOR)):
            raise ValueError(f"{raw}: not a tensor of a Qwen2AudioForConditionalGeneration")


def megatron_items(read: Callable[[], Iterable[tuple[str, torch.Tensor]]], cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """Full-state ``(name, tensor)`` (``llm.*``, ``vision.*``) of a Qwen2-Audio checkpoint, in two passes over
    ``read()`` (an iterator factory over its HF tensors): the language model, then the tower."""
    from megatron_longvideo.checkpoint.hf_map import WeightMap

    yield from WeightMap(cfg.llm, megatron_prefix="llm.").to_megatron(_text_items(read()))
    for name, t in audio_items(read(), cfg):
        yield "vision." + name, t


def hf_items(state, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """Inverse of :func:`megatron_items`: ``state`` a mapping or an iterator factory of full-state pairs ->
    transformers 5's in-memory names."""
    from megatron_longvideo.checkpoint.hf_map import WeightMap

    def read():
        return iter(state.items()) if hasattr(state, "items") else iter(state())

    for name, t in WeightMap(cfg.llm, megatron_prefix="llm.", ignore_prefixes=("vision.",)).to_hf(read()):
        yield (_HEAD if name == "lm_head.weight" else _TEXT + name[len("model."):]), t
    yield from hf_audio_items(((k[len("vision."):], v) for k, v in read() if k.startswith("vision.")), cfg)
