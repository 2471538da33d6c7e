"""RMSNorm for megatron layer specs that works with Megatron sequence parallelism without TE.

Megatron's local spec builds norms through ``WrappedTorchNorm``, which refuses
``config.sequence_parallel`` (torch's norms know nothing of it). Under sequence parallelism a norm's
input is sharded along the sequence inside the TP group, so each TP rank sees different tokens and
its weight gradient is partial: marking the weight ``sequence_parallel = True`` makes megatron's
``finalize_model_grads`` all-reduce it over the TP group, which is all that is needed.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """``y = weight * x / sqrt(mean(x^2) + eps)``, computed in fp32 and cast back (as Qwen2 does)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device="cpu"))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
