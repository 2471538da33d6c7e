"""The ``hf`` rollout engine for a language model with multimodal RoPE (Qwen2.5-VL).

transformers' own ``Qwen2_5_VLTextModel`` and an output layer run from the prompt embeddings the policy
merged (cached video tokens in place), at the three-row positions the policy computed for the prompt
(:meth:`~megatron_longvideo.models.qwen2_5_vl.model.Qwen25VLModel.rollout_positions`), so the tower
runs once per video per step and rollouts see the positions training uses. Decoding continues from the
prompt's largest position + 1 in all three rows (the "rope delta"). A small decode loop over a
``DynamicCache`` (transformers' ``generate`` would recompute positions from token ids and pixels, by
its own text-after-video rule); one prompt at a time, its ``n`` samples as a batch. Sampling:
temperature and nucleus (top-p) as :class:`~megatron_longvideo.rl.engines.base.SamplingConfig` says,
reproducible for a seed (the torch RNG is forked and seeded around each call, as in the ``hf`` engine).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from megatron_longvideo.checkpoint.hf_map import WeightMap
from megatron_longvideo.rl.engines.base import Completion, SamplingConfig, check_prompt_embeds
from megatron_longvideo.rl.engines.hf_engine import HFEngine, trim_completion

__all__ = ["MultimodalRoPEEngine", "text_config"]


def text_config(llm):
    """``Qwen2_5_VLTextConfig`` of our ``LLMConfig`` (with ``mrope_section``)."""
    from transformers import Qwen2_5_VLTextConfig

    return Qwen2_5_VLTextConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_query_groups, max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.norm_eps, tie_word_embeddings=llm.tie_word_embeddings, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # ours come from the tokenizer
        rope_parameters={"rope_type": "default", "rope_theta": llm.rotary_base, "mrope_section": list(llm.mrope_section)})


class _LanguageModel(torch.nn.Module):
    def __init__(self, llm):
        super().__init__()
        from transformers import Qwen2_5_VLTextModel

        self.model = Qwen2_5_VLTextModel(text_config(llm))
        self.lm_head = torch.nn.Linear(llm.hidden_size, llm.vocab_size, bias=False)
        if llm.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


class MultimodalRoPEEngine(HFEngine):
    """Rollouts of a Qwen2.5-VL policy's language model with transformers on ``device``, in ``dtype``."""

    def __init__(self, cfg, *, device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.float32,
                 tokenizer: Any = None, pad_token_id: int = 0):
        from megatron_longvideo.checkpoint.hf_config import check_transformers_version
        from megatron_longvideo.platform.device import compute_device

        check_transformers_version()
        llm = cfg.llm
        if llm.mrope_section is None:
            raise ValueError("MultimodalRoPEEngine needs an LLM with mrope_section (use the 'hf' engine otherwise)")
        self.hidden_size = llm.hidden_size
        self.weight_map = WeightMap(llm, megatron_prefix="llm.", ignore_prefixes=("vision.",))
        self.device = compute_device() if device is None else torch.device(device)
        self.dtype, self.tokenizer, self.pad_token_id = dtype, tokenizer, pad_token_id
        with torch.device(self.device):
            self.model = _LanguageModel(llm).to(dtype).eval()
        self.model.requires_grad_(False)
        self._synced, self._sleep_level, self._shapes = False, 0, {}

    def _step(self, embeds: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """``[n, s, h]`` embeddings at ``[3, n, s]`` positions -> last-position logits ``[n, vocab]`` (fp32)."""
        hidden = self.model.model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache,
                                  use_cache=True).last_hidden_state
        return self.model.lm_head(hidden[:, -1]).float()

    @torch.no_grad()
    def prompt_logits(self, prompt_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[vocab]`` after one prompt ``[L, h]`` at ``[3, L]`` positions."""
        from transformers import DynamicCache

        embeds = prompt_embeds.detach().to(self.device, self.dtype)[None]
        return self._step(embeds, positions.to(self.device)[:, None], DynamicCache())[0]

    @staticmethod
    def _sample(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """``[n, vocab]`` -> ``[n]`` token ids (greedy, or temperature + top-p)."""
        if sampling.greedy:
            return logits.argmax(-1)
        probs = torch.softmax(logits / float(sampling.temperature), dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > float(sampling.top_p)  # keeps the first token always
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return torch.multinomial(probs, 1)[:, 0]

    @torch.no_grad()
    def generate(self, prompt_embeds: Sequence[torch.Tensor], sampling: SamplingConfig,
                 positions: Optional[Sequence[torch.Tensor]] = None) -> list[list[Completion]]:
        """As :meth:`RolloutEngine.generate`; ``positions[i]`` ``[3, L_i]`` (default: plain text positions)."""
        from transformers import DynamicCache

        if self._sleep_level:
            raise RuntimeError("generate: the engine is asleep; call wake() (and sync_weights after a level-2 sleep)")
        if not self._synced:
            raise RuntimeError("generate: no weights yet; call sync_weights(full_state) first")
        check_prompt_embeds(prompt_embeds, self.hidden_size)
        if positions is not None and len(positions) != len(prompt_embeds):
            raise ValueError(f"positions: {len(positions)} for {len(prompt_embeds)} prompts")
        stops, n = set(sampling.stop_token_ids), sampling.n
        results = []
        with self._rng(sampling.seed):
            for i, e in enumerate(prompt_embeds):
                length = int(e.shape[0])
                pos = (torch.arange(length, device="cpu").expand(3, -1) if positions is None else positions[i].cpu())
                if tuple(pos.shape) != (3, length):
                    raise ValueError(f"positions[{i}]: expected [3, {length}], got {tuple(pos.shape)}")
                cache = DynamicCache()
                embeds = e.detach().to(self.device, self.dtype)[None].expand(n, -1, -1)
                logits = self._step(embeds, pos.to(self.device)[:, None].expand(3, n, length), cache)
                nxt = int(pos.max()) + 1
                tokens, logps = [], []
                done = torch.zeros(n, dtype=torch.bool, device=self.device)
                for step in range(sampling.max_new_tokens):
                    token = self._sample(logits, sampling)
                    tokens.append(token)
                    logps.append(torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0])
                    done |= torch.isin(token, torch.tensor(sorted(stops), device=self.device)) if stops else done
                    if bool(done.all()) or step + 1 == sampling.max_new_tokens:
                        break
                    step_pos = torch.full((3, n, 1), nxt + step, dtype=torch.long, device=self.device)
                    logits = self._step(self.model.model.embed_tokens(token)[:, None], step_pos, cache)
                ids = torch.stack(tokens, dim=1).cpu()  # [n, T]
                lp = torch.stack(logps, dim=1).cpu()
                group = []
                for r in range(n):
                    row = ids[r].tolist()
                    end, reason = trim_completion(row, sampling, self.tokenizer)
                    group.append(Completion(token_ids=tuple(row[:end]), finish_reason=reason,
                                            logprobs=tuple(lp[r, :end].tolist()) if sampling.logprobs else None))
                results.append(group)
        return results
