import os

import pytest
import torch

from megatron_longvideo.kernels import backend

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture
def cpu_kernels():
    """Skip (or fail with MLV_REQUIRE_KERNELS=1) when the C++ CPU extension is not built."""
    if os.environ.get("MLV_KERNELS") == "torch" or backend("cpu") != "cpu":
        if os.environ.get("MLV_REQUIRE_KERNELS") == "1":
            pytest.fail("MLV_REQUIRE_KERNELS=1 but the CPU kernel extension is not available")
        pytest.skip("CPU kernel extension not built (pip install --no-build-isolation -e .)")


def bitwise_equal(a, b):
    """Same dtype, shape and bits (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def rand(*shape, dtype, seed=0):
    """Random values with a few NaN / inf / -0.0 so bit-level differences would show."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    flat = x.view(-1)
    if flat.numel() >= 4:
        flat[:3] = torch.tensor([float("nan"), float("-inf"), -0.0], dtype=torch.float64)
    return x.to(dtype)
