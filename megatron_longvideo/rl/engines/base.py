"""The rollout engine interface: weights in, prompt embeddings in, sampled token ids out.

GRPO generates G responses per prompt from the *current* policy. The trainer gathers the policy's
full-shape weights (:func:`~megatron_longvideo.checkpoint.full_state.gather_full_state`), pushes them
with :meth:`RolloutEngine.sync_weights`, and hands :meth:`RolloutEngine.generate` the merged
video+text prompt embeddings (``[L_i, h]`` each, computed once by our encoder: the engine never sees
frames). An engine that places the video tokens and computes their positions itself (vLLM's
Qwen2.5-VL, ``takes_video_prompts``) gets :class:`VideoPrompt` objects instead, through
:meth:`RolloutEngine.generate_videos`: the token ids and the same cached video embeddings. Between
rollout phases :meth:`sleep` frees the engine's memory for training.

Engines: ``hf`` (transformers ``generate``, CPU default and test path), ``vllm`` (vLLM with
``enable_prompt_embeds``; for Qwen2.5-VL with ``enable_mm_embeds``) and ``megatron`` (the policy model
itself, TP-sharded, no weight sync). Build one with
:func:`megatron_longvideo.rl.engines.build_engine`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

__all__ = ["SamplingConfig", "Completion", "VideoPrompt", "RolloutEngine", "Weights", "check_prompt_embeds"]

Weights = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]
"""Megatron full-state weights: a dict or an iterator of ``(global name, full tensor)``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How responses are sampled; validated on construction."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax) decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    max_new_tokens: int = 256
    """Most tokens generated per response."""
    stop: tuple[str, ...] = ()
    """Strings that end a response (need a tokenizer in the engine)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a response (e.g. ``<|im_end|>``); kept as the response's last token."""
    n: int = 1
    """Responses per prompt (GRPO's group size G)."""
    seed: Optional[int] = None
    """Base seed of the call: response j of prompt i is drawn with
    :func:`~megatron_longvideo.rl.engines.decode.response_seed` ``(seed, i, j)`` unless the engine is given
    per-response seeds (give each data-parallel rank its own base, see :meth:`for_rank`); None: not reproducible."""
    logprobs: bool = False
    """Also return each sampled token's log-probability under the untempered model distribution."""

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n: must be a positive integer, got {self.n!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop: must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: must be non-negative integers, got {self.stop_token_ids!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed: must be None or a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def for_rank(self, rank: int) -> "SamplingConfig":
        """This config with ``seed + rank`` (distinct, reproducible streams per data-parallel rank)."""
        return self if self.seed is None else dataclasses.replace(self, seed=self.seed + rank)


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled response."""

    token_ids: tuple[int, ...]
    """Generated ids; a stop token that ended the response is included."""
    logprobs: Optional[tuple[float, ...]] = None
    """Per-token log-probabilities (untempered), when asked for."""
    finish_reason: str = "length"
    """'stop' (a stop token or string) or 'length' (max_new_tokens reached)."""


@dataclasses.dataclass(frozen=True)
class VideoPrompt:
    """One prompt as token ids plus its videos' embeddings from our encoder (cache), for an engine that
    merges and positions the video tokens itself. Built by :func:`~megatron_longvideo.rl.rollout.video_prompts`."""

    prompt_ids: torch.Tensor
    """``[P]`` token ids, each video's placeholder run expanded (the prompt the policy trains on)."""
    videos: tuple[torch.Tensor, ...]
    """``[N_v, h]`` embeddings of each video, in the order of the runs, merge-block order (the tower's output)."""
    grids: tuple[tuple[int, int, int], ...]
    """``(t, h, w)`` patch grid of each video (before the ``m x m`` merger: ``N_v = t * h * w / m^2``)."""
    seconds_per_grid: tuple[float, ...]
    """Seconds one temporal patch of each video spans (multimodal RoPE's time step)."""
    keys: tuple[Optional[str], ...] = ()
    """Identity of each video's embeddings (our cache keys), so an engine need not hash them; (): not known."""


def check_prompt_embeds(prompt_embeds: Sequence[torch.Tensor], hidden_size: int) -> None:
    """Raise ValueError unless every prompt is a non-empty float ``[L_i, hidden_size]`` tensor."""
    if len(prompt_embeds) == 0:
        raise ValueError("prompt_embeds: expected at least one prompt")
    for i, e in enumerate(prompt_embeds):
        if not isinstance(e, torch.Tensor) or e.dim() != 2 or e.shape[0] == 0 or e.shape[1] != hidden_size:
            shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"prompt_embeds[{i}]: expected a tensor [L, {hidden_size}] with L >= 1, got {shape}")
        if not e.is_floating_point():
            raise ValueError(f"prompt_embeds[{i}]: expected floating-point embeddings, got dtype {e.dtype}")


class RolloutEngine(abc.ABC):
    """Generates responses from prompt embeddings with weights pushed from the Megatron policy."""

    takes_video_prompts: bool = False
    """True for an engine that takes :class:`VideoPrompt` objects (:meth:`generate_videos`), not merged embeddings."""

    @abc.abstractmethod
    def sync_weights(self, weights: Weights) -> None:
        """Replace the engine's weights with the policy's (Megatron full-state names; a VLM's vision
        tensors are ignored: the engine runs the language model only). An iterator is consumed lazily,
        a pair at a time, and to its end: never gathered into a dict, since
        :func:`~megatron_longvideo.checkpoint.full_state.iter_full_state_items` runs a collective per bucket."""

    @abc.abstractmethod
    def generate(self, prompt_embeds: Sequence[torch.Tensor], sampling: SamplingConfig, *,
                 seeds: Optional[Sequence[Sequence[Optional[int]]]] = None) -> list[list[Completion]]:
        """``prompt_embeds[i]`` ``[L_i, h]`` -> ``sampling.n`` completions per prompt; or, with ``seeds``,
        ``len(seeds[i])`` completions of prompt i, the j-th drawn with seed ``seeds[i][j]`` whatever else
        the call holds (:mod:`~megatron_longvideo.rl.engines.decode`: how a step's responses are divided
        among ranks and still equal one rank's)."""

    def generate_videos(self, prompts: Sequence[VideoPrompt], sampling: SamplingConfig, *,
                        seeds: Optional[Sequence[Sequence[Optional[int]]]] = None) -> list[list[Completion]]:
        """``prompts[i]`` -> completions as :meth:`generate` (engines with ``takes_video_prompts``)."""
        raise NotImplementedError(f"{type(self).__name__} takes merged prompt embeddings (generate), not VideoPrompts")

    @abc.abstractmethod
    def sleep(self, level: int = 1) -> None:
        """Free memory between rollout phases. Level 1 keeps the weights (offloaded); level 2 drops
        them (call :meth:`sync_weights` after :meth:`wake`)."""

    @abc.abstractmethod
    def wake(self) -> None:
        """Undo :meth:`sleep`."""
