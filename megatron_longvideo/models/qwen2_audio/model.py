"""The Qwen2-Audio family: a Qwen2 LLM (plain RoPE) plus the replicated audio tower and projector.

``Qwen2AudioModel`` is the shared :class:`~megatron_longvideo.models.vlm.VisionLanguageModel` with an
audio tower in its tower slot. The attribute keeps the shared name ``vision`` (megatron's DDP, the
checkpoint's ``vision.`` keys, the tower-gradient reduction and the cache fingerprint all find the
tower there); it holds an :class:`~megatron_longvideo.models.qwen2_audio.audio.AudioTower`.

:func:`qwen2_audio_forward` runs one micro-batch: each audio's 30 s windows are encoded over the encode
group (MR-SP stage 1, one window per unit, through the embedding cache), the real tokens replace the
``<|AUDIO|>`` placeholders (:func:`~megatron_longvideo.models.merge.merge_video_tokens`), the sequence is
sharded over the CP ranks, and the LLM runs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from megatron_longvideo.models.llm import LLMConfig, lm_forward, unwrap
from megatron_longvideo.models.qwen2_audio.audio import AudioConfig, build_audio_tower, pack_windows
from megatron_longvideo.models.vlm import VisionLanguageModel, text_embeddings
from megatron_longvideo.parallel.groups import ParallelGroups

__all__ = ["Qwen2AudioConfig", "Qwen2AudioModel", "build_qwen2_audio", "qwen2_audio_forward", "as_windows",
           "qwen2_audio_config_from_hf", "load_hf_state", "hf_state"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2AudioConfig:
    """A Qwen2-Audio: LLM, audio tower and projector, and the audio placeholder token."""

    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig.tiny)
    """The language model (plain RoPE)."""
    audio: AudioConfig = dataclasses.field(default_factory=AudioConfig)
    """The audio tower and projector."""
    audio_token_id: int = 3
    """Placeholder token id (``<|AUDIO|>``) that marks where an audio's embeddings go (Qwen2-Audio-7B:
    151646)."""

    def __post_init__(self):
        if not 0 <= self.audio_token_id < self.llm.vocab_size:
            raise ValueError(f"audio_token_id={self.audio_token_id} is outside the vocabulary [0, {self.llm.vocab_size})")
        if self.llm.mrope_section is not None:
            raise ValueError("llm.mrope_section must be None: Qwen2-Audio's LLM uses plain RoPE")

    @property
    def video_token_id(self) -> int:
        """The placeholder id where the shared code (merge, prefill, rollouts) puts a media input's
        embeddings: the audio placeholder."""
        return self.audio_token_id

    def num_audio_tokens(self, num_mel_frames: int) -> int:
        """Placeholder tokens of an audio of ``num_mel_frames`` real log-mel frames (10 ms each)."""
        return self.audio.num_audio_tokens(num_mel_frames)

    @classmethod
    def seven_b(cls) -> "Qwen2AudioConfig":
        """The shape of Qwen2-Audio-7B (its Qwen-7B LLM and Whisper-large-v3-shaped tower): described, not run
        on CPU."""
        llm = LLMConfig(vocab_size=156032, hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=32,
                        ffn_hidden_size=11008, max_position_embeddings=8192, rotary_base=10000.0, norm_eps=1e-5)
        return cls(llm=llm, audio=AudioConfig.qwen2_audio_7b(freeze=True), audio_token_id=151646)


class Qwen2AudioModel(VisionLanguageModel):
    """LLM + the audio tower and projector (in the shared ``vision`` slot, see the module docstring)."""

    def __init__(self, cfg: Qwen2AudioConfig, groups: ParallelGroups, *, seed: int = 0, **llm_kwargs):
        def tower(llm):  # the tower takes the LLM's kernel, dtype and device
            return build_audio_tower(cfg.audio, cfg.llm.hidden_size, groups, seed=seed + 1,
                                     attention_kernel=llm_kwargs.get("attention_kernel", "auto"),
                                     params_dtype=llm_kwargs.get("params_dtype", torch.float32),
                                     device=llm_kwargs.get("device"))

        super().__init__(cfg, groups, tower, **llm_kwargs)

    @property
    def audio(self):
        """The audio tower (the same module as ``vision``)."""
        return self.vision


def build_qwen2_audio(cfg: Qwen2AudioConfig, groups: ParallelGroups, *, seed: int = 0, **llm_kwargs) -> Qwen2AudioModel:
    """This rank's Qwen2-Audio for its pipeline stage (call ``torch.manual_seed`` first for the LLM)."""
    return Qwen2AudioModel(cfg, groups, seed=seed, **llm_kwargs)


def as_windows(audio) -> torch.Tensor:
    """One audio as the tower's packed windows: a packed tensor as it is, or ``(features [w, n_mels, F],
    lengths [w])`` packed (:func:`~megatron_longvideo.models.qwen2_audio.audio.pack_windows`)."""
    if isinstance(audio, (tuple, list)):
        if len(audio) != 2:
            raise ValueError(f"audio: expected packed windows or (features, lengths), got a sequence of {len(audio)}")
        return pack_windows(*audio)
    return audio


def qwen2_audio_forward(
    model,
    groups: ParallelGroups,
    *,
    input_ids: torch.Tensor,
    audios: Optional[Sequence[Sequence]] = None,
    audio_embeds: Optional[Sequence[Sequence[torch.Tensor]]] = None,
    labels: Optional[torch.Tensor] = None,
    cache=None,
    cache_keys: Optional[Sequence[Sequence[str]]] = None,
    return_merged: bool = False,
):
    """One micro-batch through the (possibly DDP-wrapped) Qwen2-Audio model.

    ``input_ids``/``labels`` ``[b, S]`` (S a multiple of 2 x CP, x TP under SP); ``audios[i]`` the audios
    of sample i in text order, each packed windows ``[w, n_mels + 1, 3000]`` or ``(features, lengths)``
    (:func:`as_windows`); or ``audio_embeds[i]`` already-encoded ``[n, h]``. Sample i's text holds
    :meth:`Qwen2AudioConfig.num_audio_tokens` ``<|AUDIO|>`` ids per audio. Returns what the LLM returns
    (per-token loss with labels), and the merged batch with ``return_merged``.
    """
    from megatron.core import tensor_parallel

    from megatron_longvideo.models.encode import encode_videos
    from megatron_longvideo.models.merge import merge_video_tokens
    from megatron_longvideo.platform.device import device_of
    from megatron_longvideo.training.lm_step import cp_shard

    inner = unwrap(model)
    device = device_of(inner)
    input_ids = input_ids.to(device, non_blocking=True)
    labels = None if labels is None else labels.to(device, non_blocking=True)
    decoder_input, merged = None, None
    if inner.pre_process:
        if audio_embeds is None:
            per_sample = [[as_windows(a) for a in sample] for sample in (audios or [[] for _ in range(input_ids.shape[0])])]
            flat = [a for sample in per_sample for a in sample]
            keys = None if cache_keys is None else [k for sample in cache_keys for k in sample]
            encoded = iter(encode_videos(inner.vision, flat, groups, cache=cache, keys=keys) if flat else [])
            audio_embeds = [[next(encoded) for _ in sample] for sample in per_sample]
        merged = merge_video_tokens(text_embeddings(model, input_ids), input_ids, audio_embeds, inner.cfg.audio_token_id)
        decoder_input = cp_shard(merged.embeds, groups, dim=1).transpose(0, 1).contiguous()  # [s_local, b, h]
        if groups.config.sequence_parallel:
            decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input, group=groups.tp)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    out = lm_forward(model, decoder_input=decoder_input, position_ids=cp_shard(positions, groups),
                     labels=None if labels is None else cp_shard(labels, groups))
    return (out, merged) if return_merged else out


def qwen2_audio_config_from_hf(config, **llm_overrides) -> Qwen2AudioConfig:
    """Our config of a ``Qwen2AudioConfig`` of transformers (object or ``config.json`` dict)."""
    from megatron_longvideo.models.qwen2_audio.hf import config_from_hf

    return config_from_hf(config, **llm_overrides)


def load_hf_state(model, groups: ParallelGroups, items) -> None:
    """Load a Qwen2-Audio's HF ``(name, tensor)`` pairs (any transformers naming) into this rank's shards of
    ``model`` (any TP / PP layout; the tower on the first stage)."""
    from megatron_longvideo.checkpoint.full_state import load_full_state
    from megatron_longvideo.models.qwen2_audio.hf import megatron_items

    inner = unwrap(model)
    items = list(items)
    full = dict(megatron_items(lambda: iter(items), inner.cfg))
    load_full_state(inner.llm, {k[len("llm."):]: t for k, t in full.items() if k.startswith("llm.")}, groups)
    if inner.vision is not None:
        load_full_state(inner.vision, {k[len("vision."):]: t for k, t in full.items() if k.startswith("vision.")}, groups)


def hf_state(model, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """The model (any TP / PP layout; collective) as a ``Qwen2AudioForConditionalGeneration`` state dict
    (transformers 5's in-memory names, what ``load_state_dict`` takes), full shape, on every rank."""
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.full_state import gather_full_state
    from megatron_longvideo.models.qwen2_audio.hf import hf_items

    inner = unwrap(model)
    state = {f"llm.{k}": t for k, t in gather_full_state(inner.llm, groups).items()}
    tower = None
    if inner.vision is not None:  # replicated: this rank's copy is the full tower
        tower = {k: p.detach().float().cpu().clone() for k, p in inner.vision.named_parameters()}
    if groups.size(groups.pp) > 1:  # the first stage's tower, to every stage
        shared = [tower]
        dist.broadcast_object_list(shared, src=dist.get_global_rank(groups.pp, 0), group=groups.pp)
        tower = shared[0]
    state.update({f"vision.{k}": t for k, t in tower.items()})
    return dict(hf_items(state, inner.cfg))
