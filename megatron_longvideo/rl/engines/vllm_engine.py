"""The ``vllm`` rollout engine, written to vLLM's offline API (``tests/rl/test_vllm_contract.py`` checks every
call against vLLM 0.33.0's own source).

* Engine: ``vllm.LLM(model=<folder>, enable_prompt_embeds=True, enable_sleep_mode=True,
  enable_prefix_caching=True, ...)`` on a Qwen2 folder; prefix caching lets the ``n`` samples of a prompt
  prefill it once. Without a folder of real weights the engine writes ``config.json`` of our LLM to a
  temporary folder and starts with ``load_format="dummy"``; the first :meth:`sync_weights` fills it.
* Tokenizer: a Hugging Face tokenizer folder (:func:`tokenizer_folder` finds the one behind our
  tokenizers) or None: vLLM then skips tokenizer initialisation and returns token ids only (stop strings
  need a tokenizer). vLLM never takes our tokenizer objects or a ``pad_token_id``.
* Prompts: ``{"prompt_embeds": tensor [L, h]}`` each (vLLM's ``EmbedsPrompt``), one
  ``SamplingParams(n, temperature, top_p, max_tokens, stop, stop_token_ids, seed, logprobs, detokenize)``
  per prompt so that prompt i samples with ``seed + i``.
* Weight sync: Megatron full state -> weight map -> HF ``(name, tensor)`` chunks of bounded size ->
  the model's own ``load_weights`` on every worker, through ``LLM.collective_rpc`` and the worker
  extension :class:`WeightSyncExtension` (``worker_extension_cls``); vLLM builds without
  ``collective_rpc`` use the in-process driver worker. The prefix cache is reset after a sync (its
  KV entries belong to the old weights).
* Memory: ``LLM.sleep(level)`` / ``LLM.wake_up()``.

The Qwen2.5-VL family takes :class:`~megatron_longvideo.rl.engines.vllm_qwen.VLLMQwenEngine`, which
changes the folder, the inputs and the weight names through the hooks ``_configure``,
``_write_folder``, ``_engine_kwargs`` and :meth:`VLLMEngine.hf_weights`. vLLM is imported lazily:
importing this module never needs it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch

from megatron_longvideo.checkpoint.hf_map import WeightMap
from megatron_longvideo.models.llm import LLMConfig
from megatron_longvideo.models.llava_onevision.model import VLMConfig
from megatron_longvideo.rl.engines.base import Completion, RolloutEngine, SamplingConfig, Weights, check_prompt_embeds

__all__ = ["VLLMEngine", "WeightSyncExtension", "import_vllm", "chunk_weights", "tokenizer_folder", "WORKER_EXTENSION"]

WORKER_EXTENSION = f"{__name__}.WeightSyncExtension"


def import_vllm():
    """The ``vllm`` module, or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "the 'vllm' rollout engine needs vLLM, which is not installed: install the [vllm] extra "
            "(pip install 'megatron_longvideo[vllm]') on a CUDA machine, or use the 'hf' engine"
        ) from e
    return vllm


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); run through ``collective_rpc``."""

    def mlv_load_weights(self, weights: list) -> int:
        """Load HF-named ``(name, tensor)`` pairs with the model's own loader (it shards them for TP)."""
        runner = self.model_runner
        # get_model() unwraps the CUDA-graph wrapper vLLM may put around the model
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        model.load_weights(weights=weights)
        return len(weights)


def chunk_weights(items: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs into lists of at most ``max_bytes`` (a bigger tensor alone)."""
    chunk, size = [], 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, t))
        size += nbytes
    if chunk:
        yield chunk


def tokenizer_folder(tokenizer) -> Optional[str]:
    """The Hugging Face tokenizer folder behind one of our tokenizers (what vLLM loads by path), or None
    when there is none (a sentencepiece model or the byte tokenizer: vLLM then works on token ids only)."""
    from megatron_longvideo.checkpoint.hf_io import is_hf_tokenizer_folder

    source = getattr(tokenizer, "source", tokenizer)
    if isinstance(source, (str, os.PathLike)) and is_hf_tokenizer_folder(source):
        return os.fspath(source)
    return None


def _torch_dtype(dtype: Union[str, torch.dtype]) -> Optional[torch.dtype]:
    if isinstance(dtype, torch.dtype):
        return dtype
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
            "float32": torch.float32, "float": torch.float32}.get(dtype)


class VLLMEngine(RolloutEngine):
    """Rollouts of the policy's Qwen2 language model from merged prompt embeddings, with vLLM (CUDA
    machines, the ``[vllm]`` extra). ``llm_kwargs`` go to ``vllm.LLM`` as they are (vLLM's ``EngineArgs``)."""

    def __init__(self, cfg: Union[LLMConfig, VLMConfig], *, model_dir: Optional[str] = None, tokenizer: Optional[str] = None,
                 dtype: Union[str, torch.dtype] = "bfloat16", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, enable_sleep_mode: bool = True, enable_prefix_caching: bool = True,
                 seed: int = 0, sync_chunk_bytes: int = 256 * 2**20, **llm_kwargs: Any):
        vllm = import_vllm()
        if sync_chunk_bytes < 1:
            raise ValueError(f"sync_chunk_bytes: must be positive, got {sync_chunk_bytes}")
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            raise ValueError(f"tokenizer: vLLM loads a Hugging Face tokenizer folder by path (or None), got a "
                             f"{type(tokenizer).__name__}; pass tokenizer_folder(tok) for one of ours")
        self._configure(cfg)
        self.tokenizer = None if tokenizer is None else os.fspath(tokenizer)
        self.dtype = _torch_dtype(dtype)
        self.sync_chunk_bytes = sync_chunk_bytes
        self._folder = None
        if model_dir is None:
            self._folder = tempfile.TemporaryDirectory(prefix="mlv_vllm_")
            model_dir = self._folder.name
            self._write_folder(model_dir)
            llm_kwargs.setdefault("load_format", "dummy")  # random weights until the first sync
        elif not os.path.exists(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(f"{model_dir}: no config.json (export the policy with save_hf first)")
        self.model_dir = os.fspath(model_dir)
        kwargs = dict(
            model=self.model_dir,
            enable_sleep_mode=enable_sleep_mode,
            enable_prefix_caching=enable_prefix_caching,
            dtype=dtype if isinstance(dtype, str) else str(dtype).replace("torch.", ""),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            worker_extension_cls=WORKER_EXTENSION,
            **self._engine_kwargs(),
        )
        kwargs.update(llm_kwargs)
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)

    # -- what the model family changes ------------------------------------------------------------------
    def _configure(self, cfg) -> None:
        llm = cfg.llm if isinstance(cfg, VLMConfig) else cfg
        self.hidden_size = llm.hidden_size
        self.weight_map = WeightMap.language_model(cfg)
        self._llm_cfg = llm

    def _write_folder(self, folder: str) -> None:
        from megatron_longvideo.checkpoint.hf_config import qwen2_config

        config = qwen2_config(self._llm_cfg)
        config.architectures = ["Qwen2ForCausalLM"]
        config.save_pretrained(folder)

    def _engine_kwargs(self) -> dict:
        return dict(tokenizer=self.tokenizer, skip_tokenizer_init=self.tokenizer is None, enable_prompt_embeds=True)

    # -- requests ----------------------------------------------------------------------------------------
    def build_requests(self, prompt_embeds: Sequence[torch.Tensor]) -> list[dict]:
        """vLLM ``EmbedsPrompt`` dicts (CPU tensors in the engine's dtype)."""
        check_prompt_embeds(prompt_embeds, self.hidden_size)
        return [{"prompt_embeds": e.detach().to("cpu", dtype=self.dtype or e.dtype)} for e in prompt_embeds]  # [L, h]

    def sampling_params(self, sampling: SamplingConfig, index: int = 0):
        """``SamplingParams`` of prompt ``index`` (its seed is ``sampling.seed + index``)."""
        if sampling.stop and self.tokenizer is None:
            raise ValueError("sampling.stop: stop strings need a tokenizer; build the engine with tokenizer=<folder>")
        return self._vllm.SamplingParams(
            n=sampling.n,
            temperature=float(sampling.temperature),
            top_p=float(sampling.top_p),
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            seed=None if sampling.seed is None else sampling.seed + index,
            logprobs=0 if sampling.logprobs else None,  # 0: the sampled token's log-prob only
            detokenize=self.tokenizer is not None,
        )

    def generate(self, prompt_embeds: Sequence[torch.Tensor], sampling: SamplingConfig) -> list[list[Completion]]:
        return self._run(self.build_requests(prompt_embeds), sampling)

    def _run(self, requests: list[dict], sampling: SamplingConfig) -> list[list[Completion]]:
        params = [self.sampling_params(sampling, i) for i in range(len(requests))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[self._completion(o, sampling) for o in out.outputs] for out in outputs]

    @staticmethod
    def _completion(output, sampling: SamplingConfig) -> Completion:
        ids = tuple(int(t) for t in output.token_ids)
        logprobs = None
        if sampling.logprobs and output.logprobs is not None:
            logprobs = tuple(float(step[t].logprob) for step, t in zip(output.logprobs, ids))
        return Completion(token_ids=ids, logprobs=logprobs, finish_reason="stop" if output.finish_reason == "stop" else "length")

    # -- weights -----------------------------------------------------------------------------------------
    def hf_weights(self, weights: Weights) -> Iterator[tuple[str, torch.Tensor]]:
        """The HF-named tensors a sync sends (in the engine's dtype)."""
        for name, t in self.weight_map.to_hf(weights):
            yield name, t.to(dtype=self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def sync_weights(self, weights: Weights) -> None:
        for chunk in chunk_weights(self.hf_weights(weights), self.sync_chunk_bytes):
            if hasattr(self.llm, "collective_rpc"):
                self.llm.collective_rpc("mlv_load_weights", args=(chunk,))
            else:  # older vLLM: the driver worker lives in this process
                self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(chunk)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    # -- memory ------------------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        if level not in (1, 2):
            raise ValueError(f"level: must be 1 (offload weights) or 2 (drop weights), got {level!r}")
        self.llm.sleep(level=level)

    def wake(self) -> None:
        self.llm.wake_up()
