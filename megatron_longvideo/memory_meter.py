"""Exact live-tensor memory of a block of torch code, counted at the dispatcher (no sampling, no timing).

:class:`LiveTensorMeter` is a ``TorchDispatchMode``: every tensor an op returns is charged by its
storage's size until that storage is freed (a finalizer on the storage, which torch keeps alive as long
as anything, the autograd graph included, holds it). ``peak`` is the largest sum over the block, and
``largest`` the largest single tensor (in elements), which is how a test proves that no ``[sq, sk]``
tensor is ever built. Tensors that existed before the block (weights, inputs) are not counted, so the
result is the block's *working* memory. Kernel-internal scratch buffers that an op allocates and frees
inside itself are invisible here (the CPU flash kernel's per-thread blocks are small).

Deterministic (the garbage collector pauses inside the block), so tests may compare it across sizes;
on CUDA use ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorMeter"]


class LiveTensorMeter(TorchDispatchMode):
    """``with LiveTensorMeter() as m: ...``; then ``m.peak`` (bytes) and ``m.largest`` (elements)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._sizes: dict[int, int] = {}

    def __enter__(self):
        # garbage from before the block is collected first, and the collector pauses inside it, so the
        # count does not depend on when Python happens to collect reference cycles
        gc.collect()
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self._gc_was_enabled:
                gc.enable()

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._sizes or key in inputs:
                continue  # a view or in-place result: its storage is already charged, or predates the block
            self._sizes[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            self.largest = max(self.largest, t.numel())
            weakref.finalize(storage, self._free, key)
        return out
