"""The ``hf`` rollout engine for a language model with multimodal RoPE (Qwen2.5-VL).

transformers' own ``Qwen2_5_VLTextModel`` and an output layer run from the prompt embeddings the policy
merged (cached video tokens in place), at the three-row positions the policy computed for the prompt
(:meth:`~megatron_longvideo.models.qwen2_5_vl.model.Qwen25VLModel.rollout_positions`), so the tower
runs once per video per step and rollouts see the positions training uses. Decoding continues from the
prompt's largest position + 1 in all three rows (the "rope delta"). The ``hf`` engine's decode loop over
a ``DynamicCache`` (transformers' ``generate`` would recompute positions from token ids and pixels, by
its own text-after-video rule): one prefill per prompt, its responses as a batch of rows, each from its
own seeded generator (:mod:`~megatron_longvideo.rl.engines.decode`).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from megatron_longvideo.checkpoint.hf_map import WeightMap
from megatron_longvideo.rl.engines.decode import prompt_positions
from megatron_longvideo.rl.engines.hf_engine import HFEngine

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

    def _prompt_positions(self, length: int, given: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """``[3, 1, L]`` positions of a prompt (default: plain text positions) and the first response
        token's: the prompt's largest position + 1."""
        return prompt_positions(length, given, mrope=True, device=self.device)

    def _step_positions(self, position: int, rows: int) -> torch.Tensor:
        return torch.full((3, rows, 1), position, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def prompt_logits(self, prompt_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[vocab]`` after one prompt ``[L, h]`` at ``[3, L]`` positions."""
        from transformers import DynamicCache

        embeds = prompt_embeds.detach().to(self.device, self.dtype)[None]
        pos, _ = self._prompt_positions(int(prompt_embeds.shape[0]), positions)
        return self._forward(embeds, pos, DynamicCache())[0]
