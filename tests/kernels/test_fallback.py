"""Without an extension the ops fall back to the torch reference, warning once per process."""

import subprocess
import sys
import warnings

import torch

from megatron_longvideo import kernels
from megatron_longvideo.kernels import ops, reference


def test_missing_extension_warns_once(monkeypatch):
    monkeypatch.setitem(ops._EXTENSIONS, "cpu", "megatron_longvideo._no_such_extension")
    monkeypatch.setattr(ops, "_loaded", {})
    monkeypatch.setattr(ops, "_warned", False)
    x = torch.randn(7, 3)
    pos = kernels.shard_positions(7, 2, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.backend("cpu") == "torch"
        for _ in range(3):
            got = kernels.shard(x, pos)
        got_merge = kernels.merge_shard(x, x[:2], torch.tensor([-1, 0, 1, -2, -1, -1, -1]))
    assert len([w for w in caught if "torch reference" in str(w.message)]) == 1
    assert torch.equal(got, reference.shard(x, pos))
    assert torch.equal(got_merge[1], x[0]) and torch.equal(got_merge[3], torch.zeros(3))


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv("MLV_KERNELS", "torch")
    assert kernels.backend("cpu") == "torch"
    assert kernels.backend("meta") == "torch"


def test_import_is_cheap_and_loads_no_extension():
    code = (
        "import sys, megatron_longvideo.kernels as k; "
        "assert not [m for m in sys.modules if m.startswith('megatron_longvideo._kernels')]; "
        "print(k.backend('cpu'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("cpu", "torch")
