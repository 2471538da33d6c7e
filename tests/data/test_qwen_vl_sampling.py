"""Frame sampling and sizing like qwen-vl-utils (``FrameSamplingConfig(style="qwen_vl")``), checked against
qwen-vl-utils' own code in a subprocess (it imports torchvision: see ``tests/tv_shim.py``); the wheels
come from ``MLV_TORCHVISION_WHEEL`` and ``MLV_QWEN_VL_UTILS_WHEEL`` (``.ci/run`` downloads both).
The pure parts that need no reference (even counts, the pixel bounds) run everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NFRAMES = [({"fps": 2.0, "max_frames": 768}, 300, 30.0), ({"fps": 2.0, "max_frames": 768}, 37, 10.0),
           ({"fps": 2.0, "max_frames": 768}, 9, 24.0), ({"fps": 1.0, "min_frames": 6, "max_frames": 20}, 500, 25.0),
           ({"fps": 4.0, "min_frames": 5, "max_frames": 11}, 90, 8.0), ({"nframes": 7}, 40, 10.0)]
RESIZE = [(72, 120, 128 * 784, 768 * 784), (1080, 1920, 128 * 784, 768 * 784), (480, 640, 4 * 784, 64 * 784),
          (33, 2000, 4 * 784, 16384 * 784), (500, 500, 256 * 784, 256 * 784)]


def _config(ele):
    from megatron_longvideo.data.sampling import FrameSamplingConfig

    if "nframes" in ele:
        return FrameSamplingConfig(style="qwen_vl", num_frames=ele["nframes"])
    return FrameSamplingConfig(style="qwen_vl", num_frames=None, fps=ele["fps"], min_frames=ele.get("min_frames", 4),
                               max_frames=ele["max_frames"])


def test_counts_are_even_and_sizes_keep_bounds():
    from megatron_longvideo.data.sampling import fit_to_factor, qwen_vl_frame_indices, qwen_vl_num_frames

    for ele, total, fps in NFRAMES:
        n = qwen_vl_num_frames(total, fps, _config(ele))
        indices = qwen_vl_frame_indices(total, fps, _config(ele))
        assert n % 2 == 0 and len(indices) == n and indices[0] == 0 and indices[-1] == total - 1
    for h, w, lo, hi in RESIZE:
        rh, rw = fit_to_factor(h, w, factor=28, min_pixels=lo, max_pixels=hi)
        assert rh % 28 == 0 and rw % 28 == 0 and rh * rw <= max(hi, 28 * 28)
    with pytest.raises(ValueError, match="even number of frames"):
        qwen_vl_num_frames(1, 10.0, _config({"fps": 2.0, "max_frames": 768}))


def _wheels(tmp_path):
    from tests.tv_shim import unpack

    paths = []
    for var in ("MLV_TORCHVISION_WHEEL", "MLV_QWEN_VL_UTILS_WHEEL"):
        wheel = os.environ.get(var)
        if not wheel or not os.path.isfile(wheel):
            return None
        paths.append(unpack(wheel, str(tmp_path / var.lower())))
    return paths


def test_equals_qwen_vl_utils(tmp_path):
    from megatron_longvideo.data.sampling import FrameSamplingConfig, fit_to_factor, qwen_vl_num_frames
    from megatron_longvideo.data.synthetic import write_video
    from megatron_longvideo.data.video import decode_resized_uint8

    paths = _wheels(tmp_path)
    if paths is None:
        pytest.skip("qwen-vl-utils' reference not run: set MLV_TORCHVISION_WHEEL and MLV_QWEN_VL_UTILS_WHEEL to "
                    "their wheels (.ci/run downloads them); qwen-vl-utils imports torchvision")
    pytest.importorskip("decord", reason="qwen-vl-utils reads videos with decord here")
    g = np.random.default_rng(0)
    frames = [(g.random((72, 120, 3)) * 255).astype(np.uint8) for _ in range(40)]
    video = str(tmp_path / "clip.mp4")
    write_video(video, frames, fps=8)
    max_pixels = 160 * 784
    cases = {"nframes": NFRAMES, "resize": RESIZE, "max_pixels": max_pixels, "out": str(tmp_path / "theirs.npy")}
    with open(tmp_path / "cases.json", "w") as f:
        json.dump(cases, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "data", "qwen_vl_utils_check.py"), video,
                           str(tmp_path / "cases.json")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert theirs["nframes"] == [qwen_vl_num_frames(total, fps, _config(ele)) for ele, total, fps in NFRAMES]
    assert theirs["sizes"] == [list(fit_to_factor(h, w, factor=28, min_pixels=lo, max_pixels=hi)) for h, w, lo, hi in RESIZE]
    ours, indices, _ = decode_resized_uint8(video, FrameSamplingConfig(style="qwen_vl", num_frames=None, fps=2.0,
                                                                         max_frames=768, max_pixels=max_pixels),
                                            backend="decord")
    reference = torch.from_numpy(np.load(tmp_path / "theirs.npy"))
    assert list(ours.shape) == theirs["shape"] == list(reference.shape), (ours.shape, theirs["shape"])
    assert (ours.int() - reference.int()).abs().max().item() <= 1
