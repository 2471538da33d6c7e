"""Check every tile kernel this machine can run against the dense oracle: ``python -m megatron_longvideo.attention.check``.

For each backend that runs on the device (``--device cuda`` on a GPU machine: torch_flash,
torch_efficient, torch_cudnn, flex, flash_attn when installed; ``cpu``: cpu_flash), and each dtype it
takes, one shared-prefix packed layout with GQA is attended by tiles (queries of CP rank 1 of 2
against the gathered keys, so full, causal and merged tiles all occur) and compared with the dense
oracle in fp64: output, lse and dq/dk/dv. Prints one line per (backend, dtype) with the largest
relative error and exits 1 if any exceeds its dtype's tolerance. Kernels that cannot run here are
listed with the reason. This is the numerical half of the contract tests, which check the CUDA calls
against torch's schemas on CPU.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_longvideo.attention.backends import BACKENDS
from megatron_longvideo.attention.dense import chunk_index, dense_attention, visible_mask
from megatron_longvideo.attention.engine import tile_attention
from megatron_longvideo.attention.layout import SequenceLayout, gathered_chunks, rank_chunks
from megatron_longvideo.attention.tiles import plan_tiles

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def check_backend(name: str, dtype: torch.dtype, device: str, *, seq_len: int = 512, heads: int = 8, kv_heads: int = 2,
                  head_dim: int = 64) -> float:
    """Largest relative error (out, lse, dq, dk, dv) of ``name`` against the fp64 dense oracle."""
    g = torch.Generator().manual_seed(0)
    prefix, n = seq_len // 2, seq_len // 8
    seg = torch.full((2, seq_len), -1, dtype=torch.long)
    seg[:, :prefix] = 0
    for r in range(3):
        seg[:, prefix + r * n : prefix + (r + 1) * n] = r + 1
    seg[1, prefix - 7 : prefix] = 1  # a second row with another layout
    seg[1, prefix + 3 * n] = 4  # and a one-token response: a one-key diagonal tile
    layout = SequenceLayout.from_segments(seg)
    s_local = seq_len // 2
    qc, kc = rank_chunks(s_local, 2, 1), gathered_chunks(s_local, 2)
    plan = plan_tiles(layout, 2, qc, kc)

    def rand(n, h):
        return torch.randn(n, 2, h, head_dim, generator=g, dtype=torch.float64).permute(1, 2, 0, 3)

    q64, k64, v64 = rand(s_local, heads), rand(seq_len, kv_heads), rand(seq_len, kv_heads)
    dout = torch.randn(2, heads, s_local, head_dim, generator=g, dtype=torch.float64)
    q, k, v = (x.to(device=device, dtype=dtype).requires_grad_(True) for x in (q64, k64, v64))
    backend = BACKENDS[name]
    out = tile_attention(q, k, v, plan, scale=head_dim**-0.5, backend=backend)
    _, lse = tile_attention(q, k, v, plan, scale=head_dim**-0.5, backend=backend, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(device=device, dtype=dtype))
    ref = [x.detach().requires_grad_(True) for x in (q64, k64, v64)]
    mask = visible_mask(layout, 2, chunk_index(qc), chunk_index(kc))
    ref_out, ref_lse = dense_attention(*ref, mask, head_dim**-0.5)
    ref_grads = torch.autograd.grad(ref_out, ref, dout)
    errs = [((a.double().cpu() - b).abs().max() / b.abs().max()).item()
            for a, b in zip((out, lse, *grads), (ref_out, ref_lse, *ref_grads))]
    return max(errs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    failed = False
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    for name, backend in BACKENDS.items():
        if name in ("dense", "dense_recompute"):
            continue
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            probe = torch.empty(1, 1, 1, 64, dtype=dtype, device=args.device)
            reason = backend.unsupported(probe)
            if reason:
                print(f"{name:16s} {str(dtype)[6:]:9s} skipped: {reason}")
                continue
            try:
                err = check_backend(name, dtype, args.device)
            except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                print(f"{name:16s} {str(dtype)[6:]:9s} ERROR {type(e).__name__}: {e}")
                failed = True
                continue
            ok = err <= TOLERANCE[dtype]
            failed |= not ok
            print(f"{name:16s} {str(dtype)[6:]:9s} max rel err {err:.2e} (tolerance {TOLERANCE[dtype]:.0e}) "
                  f"{'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
