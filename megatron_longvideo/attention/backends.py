"""Tile kernels: one fused attention call per tile that returns its log-sum-exp, and its backward.

A backend computes, for one tile (q ``[b, h, sq, d]``, k/v ``[b, hk, sk, d]``, full or square-causal):

* ``forward(q, k, v, causal, scale) -> (out [b, h, sq, d], lse [b, h, sq] fp32, aux)``
* ``backward(dout, q, k, v, out, lse, aux, causal, scale) -> (dq, dk, dv)``, where ``out`` / ``lse``
  are the *merged* values over all tiles of those queries (see :mod:`~megatron_longvideo.attention.engine`)
  and ``aux`` is what the forward returned besides (random-number state and the like; unused without
  dropout, passed through as each op's own autograd formula does).

Inputs are views with the last dim contiguous (``[b, h, s, d]`` views of megatron's ``[s, b, h, d]``
memory); every kernel here accepts those strides. The backends (:data:`BACKENDS`):

* ``cpu_flash``: torch's CPU flash kernel, ``aten._scaled_dot_product_flash_attention_for_cpu`` and its
  ``_backward`` (fp64 / fp32 / bf16 / fp16, GQA native). The CPU default.
* ``torch_flash``: ``aten._scaled_dot_product_flash_attention`` (CUDA; fp16 / bf16, head dim <= 256,
  GQA native). The CUDA default for 16-bit inputs without the ``flash-attn`` package.
* ``torch_efficient``: ``aten._scaled_dot_product_efficient_attention`` (CUDA; fp32 too; no GQA, so
  K/V are repeated per tile). Its lse is padded to a multiple of 32 queries, and its 16-bit backward
  reads ``out`` in ``[b, s, h, d]`` memory: both are arranged before the call. The CUDA default for fp32.
* ``torch_cudnn``: ``aten._scaled_dot_product_cudnn_attention`` (CUDA; fp16 / bf16; lse ``[b, h, s, 1]``).
* ``flash_attn``: the ``flash-attn`` 2.x package (optional extra; fp16 / bf16, GQA native), through
  ``torch.ops.flash_attn`` (2.7+) or the 2.6 Python functions. The CUDA default when installed.
* ``flex``: FlexAttention (CUDA only: torch has no CPU backward for it). Its lse is differentiable, so
  the backward re-runs the tile under autograd with the gradients the merge gives each tile's
  ``(out, lse)`` (the chain rule through the log-sum-exp merge), instead of a kernel backward.
* ``dense``: the test oracle: scores materialised per tile, the FlashAttention-2 backward formulas
  written out in torch. Chosen only explicitly.

``flash-attn`` (see ``pip install megatron_longvideo[flash]``) is imported only when selected or when
``auto`` looks for it on a CUDA device.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

__all__ = ["Backend", "BACKENDS", "KERNELS", "get_backend"]


class Backend:
    """One tile kernel (see module docstring)."""

    name = "base"
    native_gqa = False
    """K/V may have fewer heads than Q (no repeat needed)."""
    device_type = "cpu"
    dtypes: tuple = ()
    max_head_dim: Optional[int] = None

    def unsupported(self, q: torch.Tensor) -> Optional[str]:
        """Why this kernel cannot run on ``q``'s device / dtype / head dim, or None."""
        if q.device.type != self.device_type:
            return f"runs on {self.device_type} tensors, got a {q.device.type} tensor"
        if q.dtype not in self.dtypes:
            return f"takes {', '.join(str(d).replace('torch.', '') for d in self.dtypes)}, got {str(q.dtype).replace('torch.', '')}"
        if self.max_head_dim is not None and q.shape[-1] > self.max_head_dim:
            return f"takes head dims up to {self.max_head_dim}, got {q.shape[-1]}"
        return None

    def for_tile(self, num_keys: int) -> "Backend":
        """The kernel that runs a tile of ``num_keys`` keys: this one, or a fallback for shapes it
        cannot take (the engine records which, so the tile's backward uses the same kernel)."""
        return self

    def forward(self, q, k, v, causal: bool, scale: float):
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, aux, causal: bool, scale: float):
        raise NotImplementedError


class CPUFlash(Backend):
    name, native_gqa, device_type = "cpu_flash", True, "cpu"
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

    def forward(self, q, k, v, causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse, None

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)


class TorchFlash(Backend):
    name, native_gqa, device_type = "torch_flash", True, "cuda"
    dtypes, max_head_dim = (torch.bfloat16, torch.float16), 256

    def forward(self, q, k, v, causal, scale):
        out, lse, _, _, _, _, rng_state, unused, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return out, lse, (rng_state, unused)

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        rng_state, unused = aux
        # the kernel indexes lse as contiguous [b, h, sq] without checking: a strided view would be misread
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal, rng_state, unused,
            scale=scale)


class TorchEfficient(Backend):
    name, native_gqa, device_type = "torch_efficient", False, "cuda"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def forward(self, q, k, v, causal, scale):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale)
        return out, lse[..., : q.shape[2]], (seed, offset)

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        seed, offset = aux
        b, h, sq, _ = q.shape
        # the kernel reads lse in blocks of 32 queries (padding +inf) with strides that are multiples of 8
        padded = torch.full((b, h, -(-sq // 32) * 32), float("inf"), dtype=torch.float32, device=q.device)
        padded[..., :sq] = lse
        # its 16-bit backward reads out with a hard-coded [b, s, h, d] row stride
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, padded, seed, offset, 0.0, [True, True, True, False], causal, scale=scale)
        return dq, dk, dv


class TorchCudnn(Backend):
    """cuDNN's fused attention. It takes head dims that are multiples of 8 and tiles of more than one
    key; a one-key tile (a one-token packed response, one padding token in a chunk) runs on the
    memory-efficient kernel instead."""

    name, native_gqa, device_type = "torch_cudnn", True, "cuda"
    dtypes, max_head_dim = (torch.bfloat16, torch.float16), 128

    def unsupported(self, q):
        reason = super().unsupported(q)
        return reason or (f"takes head dims that are multiples of 8, got {q.shape[-1]}" if q.shape[-1] % 8 else None)

    def for_tile(self, num_keys):
        return BACKENDS["torch_efficient"] if num_keys == 1 else self

    def forward(self, q, k, v, causal, scale):
        out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)
        return out, lse.reshape(lse.shape[:3]), (seed, offset)

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        seed, offset = aux
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1).contiguous(), seed, offset, None, None, None, q.shape[2], k.shape[2],
            0.0, causal, scale=scale)


@functools.lru_cache(maxsize=1)
def _flash_attn_api():
    """(forward, backward, version) of the installed flash-attn 2.x, or raise ImportError."""
    import flash_attn
    from flash_attn import flash_attn_interface as fa

    version = tuple(int(x) for x in flash_attn.__version__.split(".")[:2])
    if version < (2, 6) or version >= (3, 0):
        raise ImportError(f"flash-attn {flash_attn.__version__} found; the flash_attn kernel supports 2.6 - 2.8")
    return fa._flash_attn_forward, fa._flash_attn_backward, version


class FlashAttn(Backend):
    """flash-attn 2.x: [b, s, h, d] layout (our views transposed, no copy), bottom-right causal (square tiles
    only, where it equals top-left), lse [b, h, sq] fp32; its backward writes into dq/dk/dv buffers."""

    name, native_gqa, device_type = "flash_attn", True, "cuda"
    dtypes, max_head_dim = (torch.bfloat16, torch.float16), 256

    def unsupported(self, q):
        reason = super().unsupported(q)
        if reason:
            return reason
        if q.shape[-1] % 8:
            return f"takes head dims that are multiples of 8, got {q.shape[-1]}"
        try:
            _flash_attn_api()
        except ImportError as err:
            return f"needs the flash-attn package ({err})"
        return None

    def forward(self, q, k, v, causal, scale):
        fwd, _, version = _flash_attn_api()
        qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, s, h, d]
        if version >= (2, 7):
            out, lse, _, rng_state = fwd(qs, ks, vs, 0.0, scale, causal, -1, -1, 0.0, None, False)
        else:
            out, _, _, _, _, lse, _, rng_state = fwd(qs, ks, vs, 0.0, scale, causal, (-1, -1), 0.0, None, False)
        return out.transpose(1, 2), lse, rng_state

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        _, bwd, version = _flash_attn_api()
        qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(ks), torch.empty_like(vs)
        args = (dout.transpose(1, 2), qs, ks, vs, out.transpose(1, 2), lse.contiguous(), dq, dk, dv, 0.0, scale, causal)
        if version >= (2, 7):
            bwd(*args, -1, -1, 0.0, None, False, aux)
        else:
            bwd(*args, (-1, -1), 0.0, None, False, aux)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class Dense(Backend):
    """The oracle: explicit scores per tile. Backward: the FlashAttention-2 formulas from the merged
    out/lse, written in torch (an independent check of what the fused backwards compute)."""

    name, native_gqa = "dense", False
    dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

    def unsupported(self, q):
        return None if q.dtype in self.dtypes else f"takes floating tensors, got {q.dtype}"

    @staticmethod
    def _scores(q, k, causal, scale):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # [b, h, sq, sk]
        if causal:
            keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        return s

    def forward(self, q, k, v, causal, scale):
        s = self._scores(q, k, causal, scale)
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse[..., None]), v.to(s.dtype))
        return out.to(q.dtype), lse, None

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        s = self._scores(q, k, causal, scale)
        acc = s.dtype
        p = torch.exp(s - lse[..., None].to(acc))  # this tile's block of the whole softmax
        do = dout.to(acc)
        delta = (do * out.to(acc)).sum(-1, keepdim=True)  # [b, h, sq, 1]
        dv = torch.matmul(p.transpose(-1, -2), do)
        ds = p * (torch.matmul(do, v.to(acc).transpose(-1, -2)) - delta)
        dq = torch.matmul(ds, k.to(acc)) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class Recompute(Backend):
    """Any differentiable ``(out, lse)`` forward as a tile kernel: the backward re-runs the tile under
    autograd and back-propagates what the merge hands the tile. With ``w = exp(l_t - lse)``:
    ``d out_t = w * dout`` and ``d l_t = w * (rowsum(dout * out_t) - rowsum(dout * out))``."""

    def _run(self, q, k, v, causal, scale):
        raise NotImplementedError

    def forward(self, q, k, v, causal, scale):
        with torch.no_grad():
            out, lse = self._run(q, k, v, causal, scale)
        return out, lse, None

    def backward(self, dout, q, k, v, out, lse, aux, causal, scale):
        q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        with torch.enable_grad():
            o_t, l_t = self._run(q, k, v, causal, scale)
            w = torch.exp(l_t.to(acc) - lse.to(acc))
            do = dout.to(acc)
            g_out = (w[..., None] * do).to(o_t.dtype)
            g_lse = w * ((do * o_t.to(acc)).sum(-1) - (do * out.to(acc)).sum(-1))
            return torch.autograd.grad((o_t, l_t), (q, k, v), (g_out, g_lse.to(l_t.dtype)))


class Flex(Recompute):
    """FlexAttention, compiled with dynamic shapes (tiles of a packed layout come in many sizes, and a
    static compile would recompile per size until torch's recompile limit, then run the unfused path
    that builds the scores). Explicitly chosen only; its CUDA numerics are checked by
    ``python -m megatron_longvideo.attention.check``."""

    name, native_gqa, device_type = "flex", True, "cuda"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def unsupported(self, q):
        reason = super().unsupported(q)
        if reason:
            return reason
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError:
            return f"needs torch.nn.attention.flex_attention (torch {torch.__version__} has none)"
        return None

    def _run(self, q, k, v, causal, scale):
        from torch.nn.attention import flex_attention as fa

        mask = _flex_causal_mask(q.shape[2], q.device) if causal else None
        # uncompiled, flex_attention materialises the scores: on CUDA it runs compiled (its fused kernel)
        run = _compiled_flex() if q.is_cuda else fa.flex_attention
        kwargs = dict(block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        if hasattr(fa, "AuxRequest"):
            out, aux = run(q, k, v, return_aux=fa.AuxRequest(lse=True), **kwargs)
            return out, aux.lse
        return run(q, k, v, return_lse=True, **kwargs)  # torch before AuxRequest


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


@functools.lru_cache(maxsize=32)
def _flex_causal_mask(n: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, n, n, device=device)


class DenseRecompute(Recompute):
    """The generic recompute backward over the dense forward: tests the chain rule Flex relies on, on CPU."""

    name, native_gqa = "dense_recompute", False
    dtypes = Dense.dtypes
    unsupported = Dense.unsupported

    def _run(self, q, k, v, causal, scale):
        s = Dense._scores(q, k, causal, scale)
        lse = torch.logsumexp(s, dim=-1)
        return torch.matmul(torch.exp(s - lse[..., None]), v.to(s.dtype)).to(q.dtype), lse


BACKENDS: dict[str, Backend] = {b.name: b for b in (CPUFlash(), TorchFlash(), TorchEfficient(), TorchCudnn(), FlashAttn(),
                                                    Flex(), Dense(), DenseRecompute())}
KERNELS = ("auto",) + tuple(BACKENDS)
"""Names ``get_backend`` takes (``--attention-kernel``)."""


def _auto(q: torch.Tensor) -> Backend:
    if q.device.type == "cpu":
        return BACKENDS["cpu_flash"]
    if q.device.type == "cuda":
        for name in ("flash_attn", "torch_flash", "torch_efficient"):
            if BACKENDS[name].unsupported(q) is None:
                return BACKENDS[name]
    raise ValueError(f"attention kernel 'auto': no fused kernel for {q.device.type} {q.dtype} inputs with head dim "
                     f"{q.shape[-1]}; choose one of {KERNELS[1:]} with --attention-kernel")


def get_backend(name: str, q: Optional[torch.Tensor] = None, *, check_only: bool = False) -> Optional[Backend]:
    """The tile kernel ``name`` (one of :data:`KERNELS`) for inputs like ``q``.

    ``auto``: ``cpu_flash`` on CPU; on CUDA ``flash_attn`` when installed (16-bit), else ``torch_flash``
    (16-bit, head dim <= 256), else ``torch_efficient``. A named kernel that cannot run ``q`` raises
    ValueError saying why. ``check_only``: validate the name only.
    """
    if name not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {name!r}")
    if check_only:
        return None
    if name == "auto":
        return _auto(q)
    backend = BACKENDS[name]
    reason = backend.unsupported(q)
    if reason:
        raise ValueError(f"attention kernel {name!r} {reason}")
    return backend
