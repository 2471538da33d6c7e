"""Megatron <-> Hugging Face checkpoint conversion.

Export: a full-shape Megatron state (from :func:`gather_full_state` of a model in any TP/PP layout,
or from a dist checkpoint) -> a folder that transformers opens with its own classes and no custom
code: ``config.json`` (``Qwen2ForCausalLM``, ``LlavaOnevisionForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration`` or ``Qwen2AudioForConditionalGeneration``),
safetensors shards with an index, and optionally the tokenizer files. Tensors stream through the
weight map into the shard writer, which holds one shard at a time. Qwen2.5-VL and Qwen2-Audio map
through their families' own ``hf`` modules, in two passes over the tensors (language model, then tower).

Import: such a folder (ours, or a public checkpoint) -> a Megatron full state, which
:func:`load_full_state` slices into any layout, or streamed straight into a model's shards
(:func:`load_hf_into_model`). Entry scripts start from public weights through a converted dist
checkpoint instead (:mod:`~megatron_longvideo.checkpoint.hf_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any, Mapping, Optional, Union

import torch

from megatron_longvideo.checkpoint.hf_config import check_transformers_version, config_from_hf, hf_config
from megatron_longvideo.checkpoint.hf_io import copy_tokenizer, read_checkpoint, write_shards
from megatron_longvideo.checkpoint.hf_map import Items, WeightMap
from megatron_longvideo.models.llm import LLMConfig
from megatron_longvideo.models.llava_onevision.model import VLMConfig

__all__ = ["HFCheckpoint", "save_hf", "export_model", "load_hf", "load_hf_into_model", "read_hf_config",
           "save_full_state_file", "load_full_state_file"]

ModelConfig = Union[LLMConfig, VLMConfig]


@dataclasses.dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint read into Megatron form."""

    config: ModelConfig
    """Our config of the checkpoint (or the one the caller gave)."""
    state: dict[str, torch.Tensor]
    """Full-shape Megatron state (global names), ready for ``load_full_state``."""
    unmapped: dict[str, torch.Tensor]
    """HF tensors with no Megatron home (e.g. SigLIP's unused post-layernorm); pass them back as
    ``extra_tensors`` to :func:`save_hf` to reproduce the original file exactly."""


def save_hf(
    full_state: Items,
    cfg: ModelConfig,
    out_dir: str,
    *,
    part: str = "all",
    max_shard_size: Union[int, str] = "5GB",
    dtype: Optional[torch.dtype] = None,
    tokenizer: Any = None,
    extra_tensors: Optional[Mapping[str, torch.Tensor]] = None,
    passthrough: Optional[Mapping[str, torch.Tensor]] = None,
    config_kwargs: Optional[dict] = None,
    source_config: Optional[dict] = None,
    source_names: Optional[list] = None,
    usage_files: bool = True,
    progress: bool = True,
) -> list[str]:
    """Write ``full_state`` (a dict, an iterator of Megatron ``(name, tensor)``, or a function returning
    one: a Qwen2.5-VL or a Qwen2-Audio is written in two passes over it) as a HF folder.

    ``part="language_model"`` writes a VLM's (or a Qwen2-Audio's) LLM alone as ``Qwen2ForCausalLM``.
    ``dtype`` casts floating tensors (default: keep); ``tokenizer`` is a tokenizer folder, a sentencepiece
    ``.model`` file or an object with ``save_pretrained``; ``config_kwargs`` go to the text config (e.g.
    ``eos_token_id``).
    ``passthrough``: HF tensors the library does not use, written unchanged (see :class:`WeightMap`).
    ``source_config``: the ``config.json`` dict of the checkpoint the weights came from; when it
    describes the same shapes it is written instead of a generated one, so settings we do not model
    (SigLIP's ``vision_use_head``, token ids) survive; ``source_names``, its tensor names, are written
    instead of ours where they name the same tensor (transformers versions spell the tower's differently).
    ``usage_files``: also write the generation
    config, the processor configs and a chat template (:mod:`~megatron_longvideo.checkpoint.hf_usage`).
    Returns the files written.
    """
    from megatron_longvideo.checkpoint import hf_usage
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig

    check_transformers_version()
    if isinstance(cfg, Qwen25VLConfig) and part != "all":
        raise ValueError(f"part={part!r}: a Qwen2.5-VL exports whole (its language model needs multimodal RoPE, "
                         "which Qwen2ForCausalLM does not have)")
    family = _two_pass_family(cfg) if part == "all" else None  # Qwen2.5-VL or Qwen2-Audio, whole
    weight_map = None if family else _weight_map(cfg, part)  # refuses configs with no HF equivalent before writing
    config = _export_config(cfg, part, source_config, config_kwargs)
    config.architectures = [family[1] if family else weight_map.architecture]
    if dtype is not None:
        config.dtype = dtype  # transformers 4.57 reads it as torch_dtype
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    files = ["config.json"]
    if family:  # two passes over the state (language model, tower): a mapping or an iterator factory
        hf = family[0]
        tensors, canonical, total = hf.hf_items(full_state, cfg), hf.canonical_hf_name, None
        passthrough = dict(passthrough or {})
        tensors = itertools.chain(tensors, passthrough.items())
    else:
        if callable(full_state):
            full_state = full_state()
        extra_tensors = {k: v for k, v in (extra_tensors or {}).items() if k in weight_map.extras}
        passthrough = {k: v for k, v in (passthrough or {}).items() if k not in weight_map.extras and _belongs(k, weight_map)}
        tensors = weight_map.to_hf(full_state, extra_tensors=extra_tensors, passthrough=passthrough)
        canonical, total = weight_map.canonical_hf_name, len(weight_map.hf_names) + len(passthrough)
    if source_names:
        rename = {canonical(n): n for n in source_names}
        tensors = ((rename.get(name, name), t) for name, t in tensors)
    files += write_shards(tensors, out_dir, max_shard_size=max_shard_size, dtype=dtype, total=total, progress=progress)
    if tokenizer is not None:
        files += [os.path.basename(f) for f in copy_tokenizer(tokenizer, out_dir)]
    if usage_files:
        from megatron_longvideo.models import family_of, special_tokens

        vlm = family is not None or weight_map.architecture == "LlavaOnevisionForConditionalGeneration"
        special = special_tokens(family_of(cfg)) if vlm else None
        media = "audio" if vlm and family_of(cfg) == "qwen2_audio" else "video"
        written = [hf_usage.write_generation_config(out_dir), hf_usage.write_chat_template(out_dir, special, media)]
        if vlm:
            written += hf_usage.write_processor_configs(out_dir, cfg)
        files += [os.path.basename(f) for f in written if f]
    return sorted(set(files), key=files.index)


def _two_pass_family(cfg):
    """``(hf module, architecture)`` of a family whose weights map through its own ``hf`` module, in two
    passes over the tensors (Qwen2.5-VL, Qwen2-Audio); None for those of the shared :class:`WeightMap`."""
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig

    if isinstance(cfg, Qwen25VLConfig):
        from megatron_longvideo.models.qwen2_5_vl import hf

        return hf, "Qwen2_5_VLForConditionalGeneration"
    if isinstance(cfg, Qwen2AudioConfig):
        from megatron_longvideo.models.qwen2_audio import hf

        return hf, "Qwen2AudioForConditionalGeneration"
    return None


def _hf_to_megatron(cfg: ModelConfig, part: str, read, unmapped: dict):
    """Full-state ``(name, tensor)`` of the HF tensors ``read()`` yields (an iterator factory: the two-pass
    families read the files twice); tensors with no Megatron home go to ``unmapped``."""
    family = _two_pass_family(cfg) if part == "all" else None
    if family:
        return family[0].megatron_items(read, cfg)
    return _weight_map(cfg, part).to_megatron(read(), unmapped=unmapped)


def _belongs(hf_name: str, weight_map: WeightMap) -> bool:
    """Whether a passthrough tensor goes into this export (an LLM-only export drops the vision ones)."""
    if weight_map.architecture == "Qwen2ForCausalLM":
        return hf_name.startswith(("model.", "lm_head."))
    return True


def _same_shapes(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal up to what training changes and HF does not record (freezing, the longest video)."""
    def norm(c):
        if isinstance(c, VLMConfig):
            vision = dataclasses.replace(c.vision, freeze=False, freeze_projector=False, max_frames=1)
            return dataclasses.replace(c, vision=vision)
        if hasattr(c, "vision"):  # Qwen2.5-VL
            return dataclasses.replace(c, vision=dataclasses.replace(c.vision, freeze=False, max_frames=1))
        if hasattr(c, "audio"):  # Qwen2-Audio
            return dataclasses.replace(c, audio=dataclasses.replace(c.audio, freeze=False, freeze_projector=False,
                                                                    max_windows=1))
        return c

    return type(a) is type(b) and norm(a) == norm(b)


def _export_config(cfg: ModelConfig, part: str, source_config: Optional[dict], config_kwargs: Optional[dict]):
    """The HF config object to write: the source's when it matches ``cfg``, else one made from ``cfg``."""
    from transformers import AutoConfig

    llm_only = part == "language_model"
    target = cfg.llm if llm_only and not isinstance(cfg, LLMConfig) else cfg
    if source_config is not None:
        source = dict(source_config)
        if llm_only and source.get("model_type") in ("llava_onevision", "qwen2_audio"):
            source = dict(source["text_config"])
        try:
            matches = _same_shapes(config_from_hf(source), target)
        except (ValueError, KeyError, TypeError):
            matches = False
        if matches:
            model_type = source.pop("model_type")
            for key in ("architectures", "transformers_version", "_name_or_path"):
                source.pop(key, None)
            config = AutoConfig.for_model(model_type, **source)
            for key, value in (config_kwargs or {}).items():
                setattr(config.get_text_config() if hasattr(config, "get_text_config") else config, key, value)
            return config
    if hasattr(target, "vision") and not isinstance(target, VLMConfig):
        from megatron_longvideo.models.qwen2_5_vl.hf import hf_config as qwen_hf_config

        return qwen_hf_config(target, **(config_kwargs or {}))
    return hf_config(target, **(config_kwargs or {}))


def export_model(model, groups, cfg: ModelConfig, out_dir: str, *, writer_rank: int = 0, **save_kwargs) -> Optional[list[str]]:
    """Gather ``model`` (any TP/PP layout; collective over all ranks) and write it on ``writer_rank``.
    Returns the files on the writer, None elsewhere; every rank returns once the folder is complete."""
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.full_state import gather_full_state

    state = gather_full_state(model, groups)
    rank = dist.get_rank() if dist.is_initialized() else 0
    files, error = None, None
    if rank == writer_rank:
        try:
            files = save_hf(state, cfg, out_dir, **save_kwargs)
        except Exception as e:  # other ranks must not wait forever at the barrier
            error = e
    del state
    if dist.is_initialized():
        flag = torch.tensor([0 if error is None else 1])
        dist.all_reduce(flag)
        if flag.item() and error is None:
            raise RuntimeError(f"export to {out_dir} failed on rank {writer_rank}")
    if error is not None:
        raise error
    return files


def read_hf_config(hf_dir: str) -> ModelConfig:
    """Our config of the HF folder ``hf_dir`` (a Qwen2, LLaVA-OneVision, Qwen2.5-VL or Qwen2-Audio
    ``config.json``)."""
    from transformers import AutoConfig

    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (not a Hugging Face model folder?)")
    try:
        with open(path) as f:
            json.load(f)
        config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    except (json.JSONDecodeError, ValueError, OSError) as e:
        raise ValueError(f"{path}: corrupt or unsupported config ({e})") from e
    return config_from_hf(config)


_PARTS = ("all", "language_model", "vision_tower")


def _weight_map(cfg: ModelConfig, part: str) -> WeightMap:
    if part not in _PARTS:
        raise ValueError(f"part: must be one of {_PARTS}, got {part!r}")
    if part == "language_model":  # any family (Qwen2-Audio too): its Qwen2 under ``llm.``
        return WeightMap.language_model(cfg)
    if part == "vision_tower":
        if not isinstance(cfg, VLMConfig):
            raise ValueError("part='vision_tower' needs the VLMConfig of the model to initialise")
        return WeightMap.vision_tower(cfg)
    return WeightMap(cfg)


def load_hf(hf_dir: str, cfg: Optional[ModelConfig] = None, *, part: str = "all", progress: bool = False) -> HFCheckpoint:
    """Read the HF folder ``hf_dir`` into a Megatron full state. With ``cfg`` (the model to load into)
    every tensor is checked against it, so a checkpoint of another shape fails naming the tensor.

    ``part="language_model"`` reads a ``Qwen2ForCausalLM`` folder into the ``llm.`` part of a VLM
    ``cfg``; ``part="vision_tower"`` a SigLIP folder (``SiglipVisionModel`` or ``SiglipModel``) into
    its ``vision.vit.`` part: how a VLM starts from public LLM and ViT weights."""
    check_transformers_version()
    if cfg is None:
        if part != "all":
            raise ValueError(f"part={part!r} needs cfg, the config of the model to initialise")
        cfg = read_hf_config(hf_dir)
    unmapped: dict[str, torch.Tensor] = {}
    state = dict(_hf_to_megatron(cfg, part, lambda: read_checkpoint(hf_dir, progress=progress), unmapped))
    return HFCheckpoint(config=cfg, state=state, unmapped=unmapped)


def load_hf_into_model(model, groups, hf_dir: str, cfg: Optional[ModelConfig] = None, *, part: str = "all") -> HFCheckpoint:
    """Load the HF folder into this rank's shards of ``model`` (any layout). ``cfg`` defaults to the
    model's own (``VideoLanguageModel.cfg``), else the checkpoint's. With ``part`` other than 'all'
    only that part of the model is overwritten. Tensors stream from the files into the shards one at a
    time (memory: the model plus one tensor), so the returned checkpoint's ``state`` is empty."""
    from megatron_longvideo.checkpoint.full_state import load_full_state_items
    from megatron_longvideo.models.llm import unwrap

    check_transformers_version()
    if cfg is None:
        cfg = getattr(unwrap(model), "cfg", None) or read_hf_config(hf_dir)
    unmapped: dict[str, torch.Tensor] = {}
    items = _hf_to_megatron(cfg, part, lambda: read_checkpoint(hf_dir), unmapped)
    load_full_state_items(model, items, groups, strict=part == "all")
    return HFCheckpoint(config=cfg, state={}, unmapped=unmapped)


_FORMAT = "megatron_longvideo.full_state/1"


def _config_to_dict(cfg: ModelConfig) -> dict:
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig
    from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig

    kind = ("qwen2_5_vl" if isinstance(cfg, Qwen25VLConfig) else "qwen2_audio" if isinstance(cfg, Qwen2AudioConfig)
            else "vlm" if isinstance(cfg, VLMConfig) else "llm")
    return {"kind": kind, **dataclasses.asdict(cfg)}


def _config_from_dict(d: dict) -> ModelConfig:
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig

    d = dict(d)
    kind = d.pop("kind", None)
    if kind == "vlm":
        return VLMConfig(llm=LLMConfig(**d["llm"]), vision=VisionConfig(**d["vision"]), video_token_id=d["video_token_id"])
    if kind == "llm":
        return LLMConfig(**d)
    if kind == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig
        from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

        return Qwen25VLConfig(llm=LLMConfig(**d["llm"]), vision=QwenVisionConfig(**d["vision"]),
                              video_token_id=d["video_token_id"], image_token_id=d.get("image_token_id"),
                              text_after=d.get("text_after", "max"))
    if kind == "qwen2_audio":
        from megatron_longvideo.models.qwen2_audio.audio import AudioConfig
        from megatron_longvideo.models.qwen2_audio.model import Qwen2AudioConfig

        return Qwen2AudioConfig(llm=LLMConfig(**d["llm"]), audio=AudioConfig(**d["audio"]),
                                audio_token_id=d["audio_token_id"])
    raise ValueError(f"unknown model kind {kind!r} (expected 'llm', 'vlm', 'qwen2_5_vl' or 'qwen2_audio')")


def save_full_state_file(path: str, cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> None:
    """One ``torch.save`` file holding a full state and its config (the converter's Megatron side)."""
    torch.save({"format": _FORMAT, "config": _config_to_dict(cfg), "state": dict(state)}, path)


def load_full_state_file(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """``(config, full state)`` of a file written by :func:`save_full_state_file`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such full-state file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: corrupt or unreadable full-state file ({e})") from e
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a megatron_longvideo full-state file (expected format {_FORMAT!r})")
    return _config_from_dict(blob["config"]), blob["state"]
