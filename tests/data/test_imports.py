"""Importing the data package stays light: no megatron, decord or DALI."""

from __future__ import annotations

import subprocess
import sys


def test_import_pulls_no_optional_heavy_dependency():
    code = ("import sys, megatron_longvideo.data\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'decord') "
            "or m.startswith('nvidia.dali'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
