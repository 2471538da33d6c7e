"""Rollout engines behind one interface (:class:`RolloutEngine`): ``hf`` (transformers, CPU default)
and ``vllm`` (vLLM, the ``[vllm]`` extra). See :mod:`megatron_longvideo.rl.engines.base`."""

from __future__ import annotations

from megatron_longvideo.rl.engines.base import Completion, RolloutEngine, SamplingConfig

__all__ = ["Completion", "RolloutEngine", "SamplingConfig", "build_engine", "ENGINES"]

ENGINES = ("hf", "vllm")


def build_engine(name: str, cfg, **kwargs) -> RolloutEngine:
    """The rollout engine ``name`` ('hf' or 'vllm') for the model config ``cfg`` (LLMConfig or VLMConfig)."""
    if name == "hf":
        from megatron_longvideo.rl.engines.hf_engine import HFEngine

        return HFEngine(cfg, **kwargs)
    if name == "vllm":
        from megatron_longvideo.rl.engines.vllm_engine import VLLMEngine

        return VLLMEngine(cfg, **kwargs)
    raise ValueError(f"engine: must be one of {ENGINES}, got {name!r}")
