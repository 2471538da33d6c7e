"""The ``hf`` rollout engine: transformers' ``Qwen2ForCausalLM`` run from prompt embeddings.

The reference the ``vllm`` and ``megatron`` engines are tested against. Each prompt is positioned
0..L_i-1 exactly as in our model and prefilled once into a transformers ``DynamicCache``; its responses
then decode as a batch of rows (:func:`~megatron_longvideo.rl.engines.decode.decode`), each from its own
seeded generator, so a response's tokens do not depend on the batch it was drawn in. Weights come from
the Megatron policy through the weight map (TP shards already gathered).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from megatron_longvideo.checkpoint.hf_map import WeightMap
from megatron_longvideo.models.llm import LLMConfig
from megatron_longvideo.models.llava_onevision.model import VLMConfig
from megatron_longvideo.rl.engines.base import Completion, RolloutEngine, SamplingConfig, Weights, check_prompt_embeds
from megatron_longvideo.rl.engines.decode import decode, draws_of, prompt_positions, trim_completion

__all__ = ["HFEngine", "trim_completion"]


class HFEngine(RolloutEngine):
    """Rollouts with transformers on ``device`` (default: this rank's compute device), in ``dtype``."""

    def __init__(self, cfg: Union[LLMConfig, VLMConfig], *, device: Union[str, torch.device, None] = None,
                 dtype: torch.dtype = torch.float32, tokenizer: Any = None, pad_token_id: int = 0):
        from transformers import Qwen2ForCausalLM

        from megatron_longvideo.checkpoint.hf_config import check_transformers_version, qwen2_config

        check_transformers_version()
        llm = cfg if isinstance(cfg, LLMConfig) else cfg.llm  # a VLM, or the audio family
        self.hidden_size = llm.hidden_size
        self.weight_map = WeightMap.language_model(cfg)
        from megatron_longvideo.platform.device import compute_device

        self.device = compute_device() if device is None else torch.device(device)
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        with torch.device(self.device):
            self.model = Qwen2ForCausalLM(qwen2_config(llm)).to(dtype).eval()
        self.model.requires_grad_(False)
        self._synced = False
        self._sleep_level = 0
        self._shapes: dict[str, torch.Size] = {}

    # -- weights ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def sync_weights(self, weights: Weights) -> None:
        if self._sleep_level:
            raise RuntimeError("sync_weights: the engine is asleep; call wake() first")
        params = dict(self.model.named_parameters())  # a tied lm_head is the embedding's parameter
        seen = set()
        for name, t in self.weight_map.to_hf(weights):
            if name not in params:
                raise KeyError(f"{name}: the HF model has no such parameter")
            params[name].copy_(t.to(device=self.device, dtype=self.dtype))
            seen.add(name)
        missing = sorted(set(params) - seen)
        if missing:
            raise KeyError(f"sync_weights: no weights for {missing[:5]}")
        self._synced = True

    # -- generation ------------------------------------------------------------------------------------
    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """``[b, s, h]`` embeddings at ``positions`` -> last-position logits ``[b, vocab]`` (fp32)."""
        hidden = self.model.model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache,
                                  use_cache=True).last_hidden_state
        return self.model.lm_head(hidden[:, -1]).float()

    def _prompt_positions(self, length: int, given: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(positions of a one-row prompt of ``length`` tokens, the first response token's position)."""
        return prompt_positions(length, given, mrope=False, device=self.device)

    def _step_positions(self, position: int, rows: int) -> torch.Tensor:
        return torch.full((rows, 1), position, dtype=torch.long, device=self.device)

    def _check_ready(self, prompt_embeds, sampling: SamplingConfig) -> None:
        if self._sleep_level:
            raise RuntimeError("generate: the engine is asleep; call wake() (and sync_weights after a level-2 sleep)")
        if not self._synced:
            raise RuntimeError("generate: no weights yet; call sync_weights(full_state) first")
        check_prompt_embeds(prompt_embeds, self.hidden_size)
        if sampling.stop and self.tokenizer is None:
            raise ValueError("sampling.stop: stop strings need a tokenizer; build the engine with tokenizer=...")

    @torch.no_grad()
    def generate(self, prompt_embeds: Sequence[torch.Tensor], sampling: SamplingConfig,
                 positions: Optional[Sequence[torch.Tensor]] = None, *,
                 seeds: Optional[Sequence[Sequence[Optional[int]]]] = None) -> list[list[Completion]]:
        """As :meth:`RolloutEngine.generate`; each prompt is prefilled once, its responses decode together
        (:func:`~megatron_longvideo.rl.engines.decode.decode`)."""
        from transformers import DynamicCache

        self._check_ready(prompt_embeds, sampling)
        if positions is not None and len(positions) != len(prompt_embeds):
            raise ValueError(f"positions: {len(positions)} for {len(prompt_embeds)} prompts")
        draws = draws_of(sampling, len(prompt_embeds), seeds)
        results = []
        for i, e in enumerate(prompt_embeds):
            length, rows = int(e.shape[0]), len(draws[i])
            pos, first = self._prompt_positions(length, None if positions is None else positions[i])
            cache = DynamicCache()

            def prefill(e=e, pos=pos, cache=cache, rows=rows):
                logits = self._forward(e.detach().to(self.device, self.dtype)[None], pos, cache)  # [1, V]
                cache.batch_repeat_interleave(rows)  # the prompt's keys and values, once per response row
                return logits.expand(rows, -1)

            def step(token, t, cache=cache, first=first, rows=rows):
                embeds = self.model.model.embed_tokens(token)[:, None]  # [rows, 1, h]
                return self._forward(embeds, self._step_positions(first + t, rows), cache)

            results.append(decode(prefill, step, sampling, draws[i], device=self.device, tokenizer=self.tokenizer))
        return results

    # -- memory ----------------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        if level not in (1, 2):
            raise ValueError(f"level: must be 1 (offload weights) or 2 (drop weights), got {level!r}")
        if self._sleep_level:
            return
        if level == 1:
            if self.device.type != "cpu":
                self.model.to("cpu")
        else:  # keep buffers (rotary frequencies), drop parameter storage
            for name, p in self.model.named_parameters():
                self._shapes[name] = p.shape
                p.data = torch.empty(0, dtype=self.dtype, device=self.device)
            self._synced = False
        self._sleep_level = level

    def wake(self) -> None:
        if self._sleep_level == 1 and self.device.type != "cpu":
            self.model.to(self.device)
        elif self._sleep_level == 2:
            for name, p in self.model.named_parameters():
                p.data = torch.empty(self._shapes[name], dtype=self.dtype, device=self.device)
        self._sleep_level = 0
