"""CPU mode: run megatron-core 0.16.x on a CPU-only torch, over gloo.

Megatron-core assumes CUDA in a handful of ways. Every patch that makes it run without CUDA lives in
this module, each one a :class:`Patch` with a note saying which megatron code needs it. They are
applied by one explicit call, :func:`enable_cpu_mode`, which refuses to act on a machine where CUDA
is available (there the real code paths are the right ones).

Scope of the patches:

* ``torch_proxy``: inside ``megatron.core`` modules only, the module-level name ``torch`` is replaced
  by a proxy that forwards everything to torch except tensor factories (``device="cuda"`` and
  ``torch.cuda.current_device()`` become the CPU, ``pin_memory=True`` is dropped) and ``torch.cuda``
  (current device, synchronize, streams, events and RNG calls mapped to CPU equivalents). User code
  and torch itself keep the real module.
* ``rng_tracker``: megatron's model-parallel RNG tracker keeps per-region CUDA generator states; on CPU
  the same bookkeeping is done with CPU generator states.
* ``tensor_cuda``: ``Tensor.cuda()`` returns the tensor unchanged (process-wide, CPU mode only).
* ``tensor_type_name``: ``Tensor.type()`` without arguments reports the CUDA type name for a CPU
  tensor (process-wide, CPU mode only), because megatron's optimizers recognise fp32 parameters and
  gradients by the string ``'torch.cuda.FloatTensor'``.

Call :func:`enable_cpu_mode` before building any model, and again after importing megatron modules
that were not yet loaded (it is idempotent and patches modules loaded since the last call).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import sys
import types
from typing import Callable, Iterable

import torch

__all__ = ["enable_cpu_mode", "cpu_mode_enabled", "PATCHES", "Patch"]

# Megatron modules imported eagerly so that their module-level ``torch`` gets the proxy. Lazily
# imported megatron modules are covered by calling enable_cpu_mode() again.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.vision.clip_vit_model",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
)


@dataclasses.dataclass(frozen=True)
class Patch:
    """One CPU-mode patch: a name, which megatron code needs it, and the function applying it."""

    name: str
    needed_by: str
    apply: Callable[[], None]


# --------------------------------------------------------------------------------------------- #
# torch proxy for megatron.core modules
# --------------------------------------------------------------------------------------------- #
_CPU = torch.device("cpu")


def _cpu_device(device):
    """Map any CUDA device spec to the CPU; leave everything else alone."""
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _factory(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapped


_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "as_tensor", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "eye", "triu", "tril", "linspace",
)


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` / ``Event``: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def elapsed_time(self, other):
        return 0.0


class _CudaOnCPU(types.ModuleType):
    """``torch.cuda`` as megatron sees it in CPU mode."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.current_device = lambda: _CPU
        self.synchronize = lambda *args, **kwargs: None
        self.Stream = _NullStream
        self.Event = _NullStream
        self.current_stream = lambda *args, **kwargs: _NullStream()
        self.stream = lambda *args, **kwargs: contextlib.nullcontext()
        self.set_stream = lambda *args, **kwargs: None
        self.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        self.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
        self.manual_seed = lambda seed: torch.manual_seed(seed)
        self.manual_seed_all = lambda seed: torch.manual_seed(seed)
        self.memory_allocated = lambda *args, **kwargs: 0
        self.max_memory_allocated = lambda *args, **kwargs: 0
        self.empty_cache = lambda: None
        self.nvtx = types.SimpleNamespace(
            range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None,
            range=lambda *a, **k: contextlib.nullcontext(),
        )

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCPU(types.ModuleType):
    """The ``torch`` module as megatron.core modules see it in CPU mode."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))
        self.cuda = _CudaOnCPU()

    def __getattr__(self, name):
        return getattr(torch, name)


_TORCH_PROXY = _TorchOnCPU()


def _import_megatron_modules():
    for name in _MEGATRON_MODULES:
        importlib.import_module(name)


def _proxy_megatron_torch():
    """Needed by: schedules.py (``total_num_tokens`` on ``device="cuda"``), clip_grads.py and
    optimizer.py (``found_inf``, norms, overflow buffers on "cuda"), grad_scaler.py, rope_utils.py
    (``pin_memory=True``), transformer/utils.py (attention masks on "cuda"), param_and_grad_buffer.py,
    dist_checkpointing/exchange_utils.py, p2p_communication.py (``torch.cuda.synchronize``), and
    about 100 call sites allocating on ``torch.cuda.current_device()``."""
    _import_megatron_modules()
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = _TORCH_PROXY


# --------------------------------------------------------------------------------------------- #
# RNG tracker on CPU generator states
# --------------------------------------------------------------------------------------------- #
def _patch_rng_tracker():
    """Needed by: tensor_parallel/random.py: ``model_parallel_cuda_manual_seed`` and the tracker's
    ``add``/``fork`` read and write CUDA generator states (``torch.cuda.get_rng_state``,
    ``default_generators``), used by weight init and dropout under TP, and by activation recompute."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's RNG tracker keeping named CPU generator states."""

        def __init__(self, use_cudagraphable_rng=False, is_inference_rng_tracker=False):
            super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=is_inference_rng_tracker)

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mrandom.initialize_rng_tracker(force_reset=True)


# --------------------------------------------------------------------------------------------- #
# Tensor methods
# --------------------------------------------------------------------------------------------- #
_REAL_TENSOR_CUDA = torch.Tensor.cuda
_REAL_TENSOR_TYPE = torch.Tensor.type


def _patch_tensor_cuda():
    """Needed by: optimizer.py (``load_state_dict`` moves state with ``.cuda()``),
    distrib_optimizer.py (gloo gather of shards), tensor_parallel/data.py (``broadcast_data``),
    dist_checkpointing/exchange_utils.py (loaded shards ``.cuda()``)."""

    def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return self

    torch.Tensor.cuda = cuda


def _patch_tensor_type_name():
    """Needed by: optimizer.py (``Float16OptimizerWithFloat16Params`` /
    ``FP32Optimizer`` sort params by ``param.type() == 'torch.cuda.FloatTensor'``),
    distrib_optimizer.py (same check on model params), clip_grads.py (``clip_grad_by_total_norm_fp32``
    asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``)."""

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            name = _REAL_TENSOR_TYPE(self)
            # (a torch function mode dispatches the real method back through this one: rename once)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return _REAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


PATCHES: tuple[Patch, ...] = (
    Patch("torch_proxy", _proxy_megatron_torch.__doc__, _proxy_megatron_torch),
    Patch("rng_tracker", _patch_rng_tracker.__doc__, _patch_rng_tracker),
    Patch("tensor_cuda", _patch_tensor_cuda.__doc__, _patch_tensor_cuda),
    Patch("tensor_type_name", _patch_tensor_type_name.__doc__, _patch_tensor_type_name),
)

_APPLIED: set[str] = set()


def cpu_mode_enabled() -> bool:
    """Whether :func:`enable_cpu_mode` has applied its patches in this process."""
    return bool(_APPLIED)


def enable_cpu_mode(*, skip: Iterable[str] = ()) -> bool:
    """Apply every CPU-mode patch (except those named in ``skip``, used by tests that show each
    patch is needed). Returns True when CPU mode is on, False (doing nothing) when CUDA is
    available. Idempotent: a second call only re-proxies megatron modules imported since."""
    if torch.cuda.is_available():
        return False
    skip = set(skip)
    unknown = skip - {p.name for p in PATCHES}
    if unknown:
        raise ValueError(f"skip: unknown CPU-mode patch(es) {sorted(unknown)}; known: {[p.name for p in PATCHES]}")
    for patch in PATCHES:
        if patch.name in skip:
            continue
        if patch.name in _APPLIED and patch.name != "torch_proxy":
            continue
        patch.apply()
        _APPLIED.add(patch.name)
    return True
