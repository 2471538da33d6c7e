"""Our calls into the CUDA-only kernels, checked against the real packages on this CPU machine.

* torch's CUDA SDPA ops (flash, memory-efficient, cuDNN): the whole tile engine, forward and backward,
  runs on ``meta`` tensors, so every call goes through torch's own op schemas (argument names, order,
  types) and its meta shape functions, which give the lse shapes (the efficient kernel's padding, cuDNN's
  ``[b, h, s, 1]``) the backends must convert. Numerics need a GPU: ``python -m
  megatron_longvideo.attention.check`` on one.
* FlexAttention: its CPU forward is real (torch has no CPU backward), compared with the dense oracle.
* flash-attn 2.x (cannot be installed without CUDA): its ``flash_attn_interface.py`` is read from the
  published source distribution and our positional calls are bound to the real signatures; the
  return-value counts come from its ``return`` statements. ``.ci/run`` downloads the sdists
  (``MLV_FLASH_ATTN_SDISTS``); elsewhere the test skips, naming the download command.
"""

from __future__ import annotations

import ast
import inspect
import os
import tarfile

import pytest
import torch

from megatron_longvideo.attention import backends
from megatron_longvideo.attention.backends import BACKENDS
from megatron_longvideo.attention.dense import chunk_index, dense_attention, visible_mask
from megatron_longvideo.attention.engine import tile_attention
from megatron_longvideo.attention.layout import SequenceLayout, gathered_chunks, rank_chunks
from megatron_longvideo.attention.tiles import plan_tiles

TORCH_CHECKED = torch.__version__  # the version whose schemas and meta functions this run checks


@pytest.mark.parametrize("name", ["torch_flash", "torch_efficient", "torch_cudnn"])
def test_torch_cuda_ops_accept_our_calls_on_meta(name):
    backend = BACKENDS[name]
    layout = SequenceLayout.from_segments(torch.tensor([[0] * 20 + [1] * 6 + [2] * 5 + [-1] * 1] * 2))
    s_local, cp = 16, 2
    plan = plan_tiles(layout, 2, rank_chunks(s_local, cp, 1), gathered_chunks(s_local, cp))
    assert plan.num_calls > 2  # full and causal tiles, merged by lse

    def view(n, heads):  # megatron's [s, b, h, d] memory as [b, h, s, d]
        return torch.empty(n, 2, heads, 64, device="meta", dtype=torch.bfloat16).permute(1, 2, 0, 3).requires_grad_(True)

    q, k, v = view(s_local, 8), view(2 * s_local, 2), view(2 * s_local, 2)
    out = tile_attention(q, k, v, plan, scale=0.125, backend=backend)
    assert out.shape == (2, 8, s_local, 64) and out.dtype == torch.bfloat16
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dk.dtype == torch.bfloat16


def test_torch_cuda_op_outputs_as_the_backends_expect():
    q = torch.empty(2, 4, 37, 64, device="meta", dtype=torch.bfloat16)
    for name, lse_shape in (("torch_flash", (2, 4, 37)), ("torch_efficient", (2, 4, 37)), ("torch_cudnn", (2, 4, 37))):
        out, lse, aux = BACKENDS[name].forward(q, q, q, True, 0.125)
        assert out.shape == q.shape and tuple(lse.shape) == lse_shape and lse.dtype == torch.float32, name
    # the raw efficient lse is padded to 32 queries and cuDNN's is [b, h, s, 1]: the backends convert both
    raw = torch.ops.aten._scaled_dot_product_efficient_attention(q, q, q, None, True, 0.0, True)[1]
    assert raw.shape[-1] == 64
    raw = torch.ops.aten._scaled_dot_product_cudnn_attention(q, q, q, None, True, 0.0, True, False)[1]
    assert raw.dim() == 4


def test_flex_forward_matches_the_oracle_on_cpu():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64, 16, generator=g) for _ in range(3))
    for causal in (False, True):
        out, lse = backends.Flex()._run(q, k, v, causal, 0.25)
        idx = torch.arange(64)
        ref, ref_lse = dense_attention(q, k, v, visible_mask(SequenceLayout.plain(64, causal=causal), 1, idx, idx), 0.25)
        assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


def _sdists():
    paths = [p for p in os.environ.get("MLV_FLASH_ATTN_SDISTS", "").split(os.pathsep) if p]
    if not paths:
        pytest.skip("flash-attn source not available: set MLV_FLASH_ATTN_SDISTS to sdists fetched with "
                    "'pip download flash-attn==2.8.3 --no-deps --no-binary :all: --no-build-isolation' (.ci/run does)")
    return paths


def _interface(sdist: str):
    """(version, {name: (inspect.Signature, return arity)}) of _flash_attn_forward/_backward in an sdist."""
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("flash_attn/flash_attn_interface.py"))
        source = tar.extractfile(member).read().decode()
        init = next(m for m in tar.getmembers() if m.name.endswith("flash_attn/__init__.py"))
        version_line = next(line for line in tar.extractfile(init).read().decode().splitlines() if "__version__" in line)
    version = ast.literal_eval(version_line.split("=", 1)[1].strip())
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in ("_flash_attn_forward", "_flash_attn_backward"):
            args = node.args
            defaults = [None] * (len(args.args) - len(args.defaults)) + list(args.defaults)
            params = [inspect.Parameter(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        default=inspect.Parameter.empty if d is None else ast.literal_eval(d))
                      for a, d in zip(args.args, defaults)]
            returns = [n.value for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None]
            arity = len(returns[-1].elts) if isinstance(returns[-1], ast.Tuple) else 1
            found[node.name] = (inspect.Signature(params), arity)
    return version, found


def test_flash_attn_calls_bind_to_the_real_signatures(monkeypatch):
    for sdist in _sdists():
        version, api = _interface(sdist)
        calls = {}

        def recorder(name):
            signature, arity = api[name]

            def call(*args):
                bound = signature.bind(*args)  # TypeError when our call does not fit
                calls[name] = bound.arguments
                if name == "_flash_attn_forward":
                    q = bound.arguments["q"]
                    out = torch.zeros_like(q)
                    lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1])
                    return (out, lse, None, "rng") if arity == 4 else (out, q, None, None, out, lse, None, "rng")
                return torch.zeros(1)

            return call

        parsed = tuple(int(x) for x in version.split(".")[:2])
        monkeypatch.setattr(backends, "_flash_attn_api",
                            lambda: (recorder("_flash_attn_forward"), recorder("_flash_attn_backward"), parsed))
        fa = backends.FlashAttn()
        q = torch.zeros(2, 8, 16, 64, dtype=torch.bfloat16)
        k = torch.zeros(2, 2, 16, 64, dtype=torch.bfloat16)
        out, lse, aux = fa.forward(q, k, k, True, 0.125)
        assert out.shape == q.shape and lse.shape == (2, 8, 16) and aux == "rng", version
        fwd = calls["_flash_attn_forward"]
        assert fwd["causal"] is True and fwd["softmax_scale"] == 0.125 and fwd["dropout_p"] == 0.0, version
        assert fwd["q"].shape == (2, 16, 8, 64), "flash-attn takes [b, s, h, d]"
        fa.backward(torch.zeros_like(q), q, k, k, out, lse, aux, True, 0.125)
        bwd = calls["_flash_attn_backward"]
        assert bwd["rng_state"] == "rng" and bwd["causal"] is True and bwd["deterministic"] is False, version
        assert bwd["dk"].shape == (2, 16, 2, 64) and bwd["softmax_lse"].is_contiguous(), version
        window = (bwd.get("window_size_left"), bwd.get("window_size_right")) if parsed >= (2, 7) else bwd["window_size"]
        assert tuple(window) == (-1, -1), version


def test_cudnn_one_key_tiles_run_on_the_efficient_kernel_forward_and_backward():
    from megatron_longvideo.attention.engine import new_accumulators, tile_backward, tile_forward

    # a one-token packed response: its causal diagonal tile has one key, which cuDNN cannot take
    layout = SequenceLayout.from_segments(torch.tensor([[0] * 20 + [1] * 1 + [2] * 7 + [-1] * 4]))
    plan = plan_tiles(layout, 1, rank_chunks(32, 1, 0), rank_chunks(32, 1, 0))
    q = torch.empty(32, 1, 8, 64, device="meta", dtype=torch.bfloat16).permute(1, 2, 0, 3)
    k = torch.empty(32, 1, 2, 64, device="meta", dtype=torch.bfloat16).permute(1, 2, 0, 3)
    out, lse = new_accumulators(q)
    aux = tile_forward(q, k, k, plan, 0.125, BACKENDS["torch_cudnn"], out, lse, fresh=True)
    kernels = {(t.k1 - t.k0 == 1, kernel.name) for (_, tiles) in plan.groups for t, (kernel, _) in zip(tiles, aux)}
    assert (True, "torch_efficient") in kernels and (False, "torch_cudnn") in kernels, kernels
    assert all(name == "torch_efficient" for one, name in kernels if one)
    grads = [torch.zeros(x.shape, dtype=torch.float32, device="meta") for x in (q, k, k)]
    tile_backward(torch.empty_like(q), q, k, k, out.to(q.dtype), lse, plan, 0.125, BACKENDS["torch_cudnn"], aux, *grads)
