"""PyAV vs decord vs DALI (CPU) on the same files: same indices exactly, same pixels within tolerance."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from megatron_longvideo.data.backends import iter_frames_pyav
from megatron_longvideo.data.errors import VideoDecodeError
from megatron_longvideo.data.sampling import FrameSamplingConfig
from megatron_longvideo.data.synthetic import SyntheticDatasetConfig, make_synthetic_dataset
from megatron_longvideo.data.video import decode_video, probe_video

from .conftest import read_index, requires_dali, requires_decord

REQUESTS = [
    FrameSamplingConfig(num_frames=10, image_size=32),
    FrameSamplingConfig(num_frames=None, fps=2.0, max_frames=8, image_size=48),
]


@requires_decord
@pytest.mark.parametrize("cfg", REQUESTS)
@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_decord_equals_pyav(index_video, synth, cfg, codec):
    """decord and PyAV share FFmpeg's colour conversion: frames must be identical."""
    for path in [index_video(77, Fraction(25), codec), synth.video_paths[0]]:
        a = decode_video(path, cfg, backend="pyav")
        b = decode_video(path, cfg, backend="decord")
        assert a.indices == b.indices and a.timestamps == b.timestamps
        torch.testing.assert_close(b.frames, a.frames, atol=0, rtol=0)


@requires_dali
@pytest.mark.parametrize("cfg", REQUESTS)
@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_dali_cpu_matches_pyav(index_video, cfg, codec, tmp_path):
    """DALI converts YUV -> RGB itself: same indices, pixels within the tolerance stated in ``video``."""
    coloured = make_synthetic_dataset(str(tmp_path), SyntheticDatasetConfig(num_videos=2, codec=codec, seed=5))
    for path in [index_video(77, Fraction(25), codec), *coloured.video_paths]:
        a = decode_video(path, cfg, backend="pyav")
        d = decode_video(path, cfg, backend="dali")
        assert a.indices == d.indices
        diff = (d.frames - a.frames).abs()
        assert diff.mean().item() < 0.03, f"{path}: mean abs diff {diff.mean().item()}"
        assert diff.max().item() < 0.6, f"{path}: max abs diff {diff.max().item()}"
    idx = index_video(77, Fraction(25), codec)
    d = decode_video(idx, REQUESTS[0], backend="dali")
    assert [read_index(f) for f in d.frames] == d.indices


@requires_dali
def test_dali_cpu_refuses_h264_with_a_clear_message(synth):
    with pytest.raises(VideoDecodeError, match=r"unsupported codec 'h264' for DALI's CPU decoder") as e:
        decode_video(synth.video_paths[0], REQUESTS[0], backend="dali")
    assert synth.video_paths[0] in str(e.value)


def test_pyav_keeps_only_a_few_full_resolution_frames_at_once(index_video):
    """The backend hands over small chunks, so a 300-frame request never materialises 300 full frames."""
    path = index_video(300, Fraction(30))
    info = probe_video(path)
    indices = list(range(0, 300, 1))
    sizes = [chunk.shape[0] for chunk in iter_frames_pyav(info, indices, chunk_size=8)]
    assert sum(sizes) == 300 and max(sizes) <= 8


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        decode_video("x.mp4", REQUESTS[0], backend="opencv")


@requires_dali
def test_dali_gpu_copy_matches_the_installed_plugin():
    """The GPU path hands DALI's TensorGPU to torch with ``feed_ndarray(tensor, out, cuda_stream=...)``:
    checked against the installed DALI's own signature (the copy itself needs a GPU)."""
    import inspect

    import nvidia.dali
    from nvidia.dali.plugin.pytorch import feed_ndarray

    params = list(inspect.signature(feed_ndarray).parameters)
    assert params[:2] == ["dali_tensor", "arr"] and "cuda_stream" in params, (nvidia.dali.__version__, params)


def test_the_gpu_resize_path_agrees_with_the_uint8_kernel():
    """GPU-decoded frames take the float resize (torch's CUDA antialiased resize has no uint8 kernel);
    run on the CPU, it agrees with the uint8 kernel the other backends use to one grey level."""
    import torch

    from megatron_longvideo.data.video import resize_frames, resize_uint8_via_float

    frames = torch.randint(0, 256, (2, 40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    direct = resize_frames(frames, 32)
    via_float = resize_uint8_via_float(frames.permute(0, 3, 1, 2), 32)
    assert via_float.dtype == torch.uint8 and via_float.shape == direct.shape
    assert (direct.int() - via_float.int()).abs().max() <= 1
