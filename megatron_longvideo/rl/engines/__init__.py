"""Rollout engines behind one interface (:class:`RolloutEngine`): ``hf`` (transformers, CPU default)
and ``vllm`` (vLLM, the ``[vllm]`` extra), each with a variant for the Qwen2.5-VL family's multimodal
RoPE, and ``megatron`` (generation on the policy model itself, TP-sharded, no weight copy; both RoPE
kinds: :class:`~megatron_longvideo.rl.engines.megatron_engine.MegatronEngine`, built with ``policy=`` and
``groups=``). See :mod:`megatron_longvideo.rl.engines.base`."""

from __future__ import annotations

from megatron_longvideo.rl.engines.base import Completion, RolloutEngine, SamplingConfig, VideoPrompt

__all__ = ["Completion", "RolloutEngine", "SamplingConfig", "VideoPrompt", "build_engine", "ENGINES"]

ENGINES = ("hf", "vllm", "megatron")


def build_engine(name: str, cfg, **kwargs) -> RolloutEngine:
    """The rollout engine ``name`` ('hf', 'vllm' or 'megatron') for the model config ``cfg`` (LLMConfig,
    VLMConfig or a Qwen2.5-VL config, whose multimodal RoPE takes :class:`~megatron_longvideo.rl.engines.hf_mrope.MultimodalRoPEEngine`
    or :class:`~megatron_longvideo.rl.engines.vllm_qwen.VLLMQwenEngine`; 'megatron' handles both itself and
    takes ``policy=``, ``groups=``, ``tokenizer=``, ``pad_token_id=``)."""
    if name == "megatron":
        from megatron_longvideo.rl.engines.megatron_engine import MegatronEngine

        return MegatronEngine(cfg, **kwargs)
    mrope = getattr(getattr(cfg, "llm", None), "mrope_section", None) is not None
    if name == "hf" and mrope:
        from megatron_longvideo.rl.engines.hf_mrope import MultimodalRoPEEngine

        return MultimodalRoPEEngine(cfg, **kwargs)
    if name == "vllm" and mrope:
        from megatron_longvideo.rl.engines.vllm_qwen import VLLMQwenEngine

        return VLLMQwenEngine(cfg, **kwargs)
    if name == "hf":
        from megatron_longvideo.rl.engines.hf_engine import HFEngine

        return HFEngine(cfg, **kwargs)
    if name == "vllm":
        from megatron_longvideo.rl.engines.vllm_engine import VLLMEngine

        return VLLMEngine(cfg, **kwargs)
    raise ValueError(f"engine: must be one of {ENGINES}, got {name!r}")
