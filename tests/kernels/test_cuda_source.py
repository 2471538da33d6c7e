"""The CUDA kernels compile for sm_90 with nvcc (nothing CUDA runs on the CPU machines)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: cannot compile csrc/*.cu")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cu_compiles_for_sm90(source, tmp_path):
    out = subprocess.run(
        ["nvcc", "-arch=sm_90", "-O3", "-c", str(CSRC / source), "-o", str(tmp_path / "k.o"),
         "-Xcompiler", "-Wall", "-Werror", "all-warnings"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert os.path.getsize(tmp_path / "k.o") > 0


def test_cu_sources_include_only_cuda_headers():
    """ATen's CUDA headers are absent from the CPU torch wheel: keep .cu files free of torch."""
    for source in CSRC.glob("*.cu"):
        for line in source.read_text().splitlines():
            if line.startswith("#include"):
                assert any(h in line for h in ("cuda", "stdint", '"rows.h"')), (source.name, line)
