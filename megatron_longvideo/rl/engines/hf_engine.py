"""The ``hf`` rollout engine: transformers ``Qwen2ForCausalLM.generate`` from prompt embeddings.

The CPU default and the reference the ``vllm`` engine is tested against. A batch of prompts of
different lengths is left-padded (``attention_mask`` 0 on the padding; transformers derives the
position ids from the mask, so each prompt is positioned 0..L_i-1 exactly as in our model). Weights
come from the Megatron policy through the weight map (TP shards already gathered). Sampling is
reproducible for a seed: the torch RNG is forked and seeded around each call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence, Union

import torch

from megatron_longvideo.checkpoint.hf_map import WeightMap
from megatron_longvideo.models.llm import LLMConfig
from megatron_longvideo.models.llava_onevision.model import VLMConfig
from megatron_longvideo.rl.engines.base import Completion, RolloutEngine, SamplingConfig, Weights, check_prompt_embeds

__all__ = ["HFEngine", "trim_completion"]


def trim_completion(token_ids: Sequence[int], sampling: SamplingConfig, tokenizer: Any = None) -> tuple[int, str]:
    """(length, finish reason) of one generated row: up to and including the first stop token, or the
    token that completes the first stop string; else everything ('length')."""
    ids = list(token_ids)
    end, reason = len(ids), "length"
    stops = set(sampling.stop_token_ids)
    for k, t in enumerate(ids):
        if t in stops:
            end, reason = k + 1, "stop"
            break
    if sampling.stop and tokenizer is not None:
        for k in range(1, end + 1):
            text = tokenizer.decode(ids[:k])
            if any(s in text for s in sampling.stop):
                return k, "stop"
    return end, reason


class HFEngine(RolloutEngine):
    """Rollouts with transformers on ``device`` (default: this rank's compute device), in ``dtype``."""

    def __init__(self, cfg: Union[LLMConfig, VLMConfig], *, device: Union[str, torch.device, None] = None,
                 dtype: torch.dtype = torch.float32, tokenizer: Any = None, pad_token_id: int = 0):
        from transformers import Qwen2ForCausalLM

        from megatron_longvideo.checkpoint.hf_config import check_transformers_version, qwen2_config

        check_transformers_version()
        llm = cfg.llm if isinstance(cfg, VLMConfig) else cfg
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
    def _generation_config(self, sampling: SamplingConfig):
        from transformers import GenerationConfig

        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            num_return_sequences=sampling.n,
            top_k=0,  # transformers 4.x defaults to top-k 50; our sampling has no top-k
            pad_token_id=self.pad_token_id,
            eos_token_id=list(sampling.stop_token_ids) or None,
            return_dict_in_generate=True,
            output_logits=sampling.logprobs,
        )
        if not sampling.greedy:
            kwargs.update(temperature=float(sampling.temperature), top_p=float(sampling.top_p))
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop))
        return GenerationConfig(**kwargs)

    def _rng(self, seed: Optional[int]):
        if seed is None:
            return contextlib.nullcontext()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []

        @contextlib.contextmanager
        def seeded():
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                yield

        return seeded()

    @torch.no_grad()
    def generate(self, prompt_embeds: Sequence[torch.Tensor], sampling: SamplingConfig) -> list[list[Completion]]:
        if self._sleep_level:
            raise RuntimeError("generate: the engine is asleep; call wake() (and sync_weights after a level-2 sleep)")
        if not self._synced:
            raise RuntimeError("generate: no weights yet; call sync_weights(full_state) first")
        check_prompt_embeds(prompt_embeds, self.hidden_size)
        if sampling.stop and self.tokenizer is None:
            raise ValueError("sampling.stop: stop strings need a tokenizer; build the engine with tokenizer=...")
        lengths = [int(e.shape[0]) for e in prompt_embeds]
        batch, longest = len(prompt_embeds), max(lengths)
        embeds = torch.zeros(batch, longest, self.hidden_size, dtype=self.dtype, device=self.device)  # [B, L, h]
        mask = torch.zeros(batch, longest, dtype=torch.long, device=self.device)  # [B, L], left padding
        for i, e in enumerate(prompt_embeds):
            embeds[i, longest - lengths[i]:] = e.detach().to(device=self.device, dtype=self.dtype)
            mask[i, longest - lengths[i]:] = 1
        extra = {"tokenizer": self.tokenizer} if sampling.stop else {}
        with self._rng(sampling.seed):
            out = self.model.generate(inputs_embeds=embeds, attention_mask=mask,
                                      generation_config=self._generation_config(sampling), **extra)
        sequences = out.sequences.cpu()  # [B * n, T_new] (inputs_embeds only: new tokens)
        logprobs = None
        if sampling.logprobs:
            logits = torch.stack(out.logits, dim=1).float()  # [B * n, T_new, V], before any processor
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, sequences[..., None].to(logits.device))[..., 0].cpu()
        results: list[list[Completion]] = []
        for i in range(batch):
            group = []
            for r in range(sampling.n):
                row = i * sampling.n + r
                ids = sequences[row].tolist()
                end, reason = trim_completion(ids, sampling, self.tokenizer)
                lp = tuple(logprobs[row, :end].tolist()) if logprobs is not None else None
                group.append(Completion(token_ids=tuple(ids[:end]), logprobs=lp, finish_reason=reason))
            results.append(group)
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
