"""The one device rule, and an audit that holds the library to it.

A rank computes on ``cuda:LOCAL_RANK`` when CUDA is available and on the CPU otherwise
(:func:`compute_device`). Models are built (initialised on the CPU where megatron's
``use_cpu_initialization`` needs it) and then moved to that device once (:func:`to_compute_device`);
every tensor that meets an activation or a collective is created on the model's device, and host-side
index math says ``device="cpu"`` explicitly. NCCL is the backend on CUDA, gloo on the CPU.

:class:`DeviceAudit` checks the last point: inside it, every tensor factory call (``torch.zeros``,
``torch.arange``, ``torch.tensor``, ...) made *from this library's own code* without an explicit
``device=`` is recorded with its file and line. A test runs a whole GRPO step under it. (A default
device of ``meta`` would also catch strays, but it breaks megatron-core and transformers, whose
internals rightly rely on the default device; the audit looks at our frames only.)
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["compute_device", "to_compute_device", "device_of", "DeviceAudit"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.as_tensor,
              torch.randn, torch.rand, torch.randint, torch.linspace, torch.eye, torch.randperm}


def compute_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (the device torchrun gives this rank), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def to_compute_device(module: torch.nn.Module, device: Optional[torch.device] = None) -> torch.nn.Module:
    """Move a (CPU-initialised) module to ``device`` (default :func:`compute_device`) once; returns it."""
    device = compute_device() if device is None else torch.device(device)
    if device.type != "cpu":
        module.to(device)
    return module


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without parameters)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class DeviceAudit(TorchFunctionMode):
    """Record tensor factories called from this package's code without an explicit ``device``.

    ``with DeviceAudit() as audit: ...``; ``audit.strays`` lists ``"file:line function"`` strings.
    ``raise_on_stray=True`` raises at the first one instead.
    """

    def __init__(self, *, raise_on_stray: bool = False, exclude: tuple[str, ...] = ("platform/cpu.py",)):
        super().__init__()
        self.raise_on_stray = raise_on_stray
        self.exclude = exclude
        self.strays: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            name = frame.f_code.co_filename
            if name.startswith(_PACKAGE_DIR) and not any(name.endswith(e) for e in self.exclude):
                where = f"{os.path.relpath(name, os.path.dirname(_PACKAGE_DIR))}:{frame.f_lineno} {func.__name__}"
                if self.raise_on_stray:
                    raise RuntimeError(f"tensor created without an explicit device at {where}")
                if where not in self.strays:
                    self.strays.append(where)
        return func(*args, **kwargs)


def _probe_for_tests():
    """A deliberate stray (used by the test that shows the audit catches one)."""
    return torch.zeros(1)
