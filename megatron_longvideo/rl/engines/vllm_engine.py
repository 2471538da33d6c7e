"""The ``vllm`` rollout engine, written to vLLM's offline API (``tests/rl/test_vllm_contract.py`` checks every
call against vLLM 0.33.0's own source).

* Engine: ``vllm.LLM(model=<folder>, enable_prompt_embeds=True, enable_sleep_mode=True,
  enable_prefix_caching=True, ...)`` on a Qwen2 folder; prefix caching lets the ``n`` samples of a prompt
  prefill it once. Without a folder of real weights the engine writes ``config.json`` of our LLM to a
  temporary folder and starts with ``load_format="dummy"``; the first :meth:`sync_weights` fills it.
* Tokenizer: a Hugging Face tokenizer folder (:func:`tokenizer_folder` finds the one behind our
  tokenizers) or None: vLLM then skips tokenizer initialisation and returns token ids only (stop strings
  need a tokenizer). vLLM never takes our tokenizer objects or a ``pad_token_id``.
* Prompts: ``{"prompt_embeds": tensor [L, h]}`` each (vLLM's ``EmbedsPrompt``), one request per response
  with ``SamplingParams(n=1, temperature, top_p, max_tokens, stop, stop_token_ids, seed, logprobs,
  detokenize)``: response j of prompt i is drawn with its own seed (:mod:`~megatron_longvideo.rl.engines.decode`),
  so the responses of a step can be divided among ranks; the requests of a prompt share its prefix cache.
* Weight sync: Megatron full state -> weight map -> HF ``(name, tensor)`` chunks of bounded size ->
  the model's own ``load_weights`` on every worker, through ``LLM.collective_rpc`` and the worker
  extension :class:`WeightSyncExtension` (``worker_extension_cls``); vLLM builds without
  ``collective_rpc`` use the in-process driver worker. The prefix cache is reset after a sync (its
  KV entries belong to the old weights).
* Memory: ``LLM.sleep(level)`` / ``LLM.wake_up()``. ``gpu_memory_utilization`` (the share of the GPU
  vLLM may take for weights, activations and KV cache) defaults to what is free beside Megatron when the
  engine starts, less what the optimizer has yet to allocate (:func:`gpu_memory_budget`).
* One engine per GPU: in a torchrun job (torch.distributed initialised, more than one rank) each rank
  starts its own single-GPU engine with ``distributed_executor_backend="external_launcher"`` (vLLM then
  reuses the job's process group; every rank generates its own share of the responses, independently).

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
from megatron_longvideo.rl.engines.decode import draws_of

__all__ = ["VLLMEngine", "WeightSyncExtension", "import_vllm", "chunk_weights", "tokenizer_folder", "WORKER_EXTENSION",
           "gpu_memory_budget", "memory_utilization"]

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


def memory_utilization(free_bytes: int, total_bytes: int, *, reserve_bytes: int = 0, margin: float = 0.05) -> float:
    """The ``gpu_memory_utilization`` that fits vLLM in what is free: ``(free - reserve) / total - margin``.
    Raises ValueError (with the numbers) when that leaves less than 5% of the GPU."""
    if total_bytes <= 0:
        raise ValueError(f"total GPU memory: must be positive, got {total_bytes}")
    share = (free_bytes - reserve_bytes) / total_bytes - margin
    if share < 0.05:
        gib = 2**30
        raise ValueError(f"vLLM engine: {free_bytes / gib:.1f} GiB of {total_bytes / gib:.1f} GiB are free, and "
                         f"{reserve_bytes / gib:.1f} GiB are reserved for what training has yet to allocate: too little "
                         "for an engine; pass gpu_memory_utilization, offload the optimizer, or use more ranks")
    return round(min(share, 0.95), 4)


def gpu_memory_budget(device: Optional[torch.device] = None, *, reserve_bytes: int = 0, margin: float = 0.05) -> float:
    """:func:`memory_utilization` of this rank's GPU now (``torch.cuda.mem_get_info``)."""
    free, total = torch.cuda.mem_get_info(device)
    return memory_utilization(free, total, reserve_bytes=reserve_bytes, margin=margin)


def _colocated_backend(tensor_parallel_size: int) -> Optional[str]:
    """``external_launcher`` inside a multi-rank torch.distributed job (one engine per rank), else None."""
    import torch.distributed as dist

    if tensor_parallel_size == 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "external_launcher"
    return None


def _torch_dtype(dtype: Union[str, torch.dtype]) -> Optional[torch.dtype]:
    if isinstance(dtype, torch.dtype):
        return dtype
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
            "float32": torch.float32, "float": torch.float32}.get(dtype)


class VLLMEngine(RolloutEngine):
    """Rollouts of the policy's Qwen2 language model from merged prompt embeddings, with vLLM (CUDA
    machines, the ``[vllm]`` extra). ``gpu_memory_utilization`` None: :func:`gpu_memory_budget` with
    ``memory_reserve_bytes`` held back for training. ``llm_kwargs`` go to ``vllm.LLM`` as they are (vLLM's
    ``EngineArgs``)."""

    def __init__(self, cfg: Union[LLMConfig, VLMConfig], *, model_dir: Optional[str] = None, tokenizer: Optional[str] = None,
                 dtype: Union[str, torch.dtype] = "bfloat16", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: Optional[float] = None, memory_reserve_bytes: int = 0,
                 enable_sleep_mode: bool = True, enable_prefix_caching: bool = True,
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
        if gpu_memory_utilization is None:  # what is free beside Megatron now, less what it will still allocate
            gpu_memory_utilization = gpu_memory_budget(reserve_bytes=memory_reserve_bytes) if torch.cuda.is_available() else 0.5
        backend = _colocated_backend(tensor_parallel_size)
        if backend is not None:
            llm_kwargs.setdefault("distributed_executor_backend", backend)
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
        llm = cfg if isinstance(cfg, LLMConfig) else cfg.llm  # a VLM, or the audio family
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

    def sampling_params(self, sampling: SamplingConfig, seed: Optional[int] = None):
        """``SamplingParams`` of one response (``n=1``) drawn with ``seed``."""
        if sampling.stop and self.tokenizer is None:
            raise ValueError("sampling.stop: stop strings need a tokenizer; build the engine with tokenizer=<folder>")
        return self._vllm.SamplingParams(
            n=1,
            temperature=float(sampling.temperature),
            top_p=float(sampling.top_p),
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            seed=seed,
            logprobs=0 if sampling.logprobs else None,  # 0: the sampled token's log-prob only
            detokenize=self.tokenizer is not None,
        )

    def generate(self, prompt_embeds: Sequence[torch.Tensor], sampling: SamplingConfig, *,
                 seeds: Optional[Sequence[Sequence[Optional[int]]]] = None) -> list[list[Completion]]:
        return self._run(self.build_requests(prompt_embeds), sampling, seeds)

    def _run(self, requests: list[dict], sampling: SamplingConfig,
             seeds: Optional[Sequence[Sequence[Optional[int]]]] = None) -> list[list[Completion]]:
        """One vLLM request per response, each with its own seed (the seeds of
        :func:`~megatron_longvideo.rl.engines.decode.draws_of`); a prompt's requests share its prefix cache."""
        draws = draws_of(sampling, len(requests), seeds)
        flat = [(i, seed) for i, row in enumerate(draws) for seed in row]
        outputs = self.llm.generate([requests[i] for i, _ in flat], [self.sampling_params(sampling, seed) for _, seed in flat],
                                    use_tqdm=False)
        results: list[list[Completion]] = [[] for _ in requests]
        for (i, _), out in zip(flat, outputs):
            results[i].append(self._completion(out.outputs[0], sampling))
        return results

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
