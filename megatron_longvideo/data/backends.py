"""Frame sources: given a probed file and sorted frame indices, yield those frames as RGB uint8.

Each ``iter_frames_*`` is a generator of chunks ``[n, H, W, 3]`` uint8 (full resolution, a few frames
at a time) in index order, covering exactly the requested indices. The caller resizes each chunk as it
arrives, so at most one chunk of full-resolution frames is alive at once. A stream that ends before
the last requested index raises ``StreamEndedEarly`` with the number of frames it did decode.

decord and DALI are imported inside their functions; importing this module imports neither.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron_longvideo.data.errors import VideoDecodeError

DALI_CPU_CODECS = ("vp8", "vp9", "mjpeg")
"""Codecs DALI's CPU video decoder reads (H.264/HEVC/AV1 need its GPU decoder)."""


class StreamEndedEarly(Exception):
    """The stream decoded to fewer frames than the container declared."""

    def __init__(self, num_decoded: int):
        super().__init__(num_decoded)
        self.num_decoded = num_decoded


def _chunks(indices: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def iter_frames_pyav(info, indices: list[int], *, chunk_size: int = 8) -> Iterator[torch.Tensor]:
    """Decode sequentially with PyAV; only sampled frames are converted to RGB and kept."""
    import av

    if not indices:
        return
    buf = []
    pos = 0
    index = -1
    with av.open(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index != indices[pos]:
                    continue
                buf.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))  # [H, W, 3]
                pos += 1
                if len(buf) == chunk_size or pos == len(indices):
                    yield torch.stack(buf)  # [n, H, W, 3]
                    buf = []
                if pos == len(indices):
                    return
        except av.error.FFmpegError as e:
            raise VideoDecodeError(info.path, f"corrupt stream after frame {index}: {e.strerror}") from None
    raise StreamEndedEarly(index + 1)


def iter_frames_decord(info, indices: list[int], *, chunk_size: int = 8) -> Iterator[torch.Tensor]:
    """Fetch frames with decord's ``get_batch``, a few indices per call."""
    try:
        import decord
    except ImportError:
        raise ImportError(
            "the decord backend needs decord: pip install decord (or megatron_longvideo[test])"
        ) from None
    try:
        reader = decord.VideoReader(info.path, ctx=decord.cpu(0), num_threads=1)
    except (RuntimeError, decord.DECORDError) as e:
        raise VideoDecodeError(info.path, f"decord cannot open it: {str(e).splitlines()[0]}") from None
    if indices and indices[-1] >= len(reader):
        raise StreamEndedEarly(len(reader))
    for chunk in _chunks(indices, chunk_size):
        try:
            batch = reader.get_batch(chunk).asnumpy()  # [n, H, W, 3]
        except (RuntimeError, decord.DECORDError) as e:
            raise VideoDecodeError(info.path, f"decord failed on frames {chunk[0]}..{chunk[-1]}: "
                                               f"{str(e).splitlines()[0]}") from None
        yield torch.from_numpy(batch)


def _dali_pipeline(device: str, device_id: int | None):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1,
                  exec_async=False, exec_pipelined=False)
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, frames=frames, device=device)

    pipe = pipeline()
    pipe.build()
    return pipe


def iter_frames_dali(info, indices: list[int], *, chunk_size: int = 32,
                     device: str | None = None) -> Iterator[torch.Tensor]:
    """Decode with NVIDIA DALI: GPU (``mixed``) where CUDA exists, else its CPU decoder.

    ``device`` forces ``"cpu"`` or ``"mixed"``. The CPU decoder reads only ``DALI_CPU_CODECS``; any
    other codec is refused up front with a message naming the file and codec. GPU-decoded frames stay
    on the GPU (copied device to device into a torch tensor on the current stream), so the resize,
    the normalisation and the encoder read them where they are.
    """
    try:
        import numpy as np
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ImportError(
            "the dali backend needs NVIDIA DALI: pip install megatron_longvideo[dali]"
        ) from None
    if device is None:
        device = "mixed" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and info.codec not in DALI_CPU_CODECS:
        raise VideoDecodeError(
            info.path,
            f"unsupported codec {info.codec!r} for DALI's CPU decoder (it reads "
            f"{', '.join(DALI_CPU_CODECS)}); use backend='pyav' or re-encode the video as VP9",
        )
    device_id = torch.cuda.current_device() if device == "mixed" else None
    pipe = _dali_pipeline(device, device_id)
    encoded = np.fromfile(info.path, dtype=np.uint8)  # compressed bytes only
    if indices and indices[-1] >= info.num_frames:
        raise StreamEndedEarly(info.num_frames)
    for chunk in _chunks(indices, chunk_size):
        pipe.feed_input("encoded", [encoded])
        pipe.feed_input("frames", [np.asarray(chunk, dtype=np.int32)])
        try:
            (out,) = pipe.run()
        except RuntimeError as e:
            reason = next((ln for ln in str(e).splitlines() if ln.startswith("[")), str(e).splitlines()[0])
            raise VideoDecodeError(info.path, f"DALI failed on frames {chunk[0]}..{chunk[-1]}: {reason}") from None
        if device == "mixed":
            yield _dali_to_torch_cuda(out[0], device_id)  # [n, H, W, 3] uint8 on the GPU
        else:
            yield torch.from_numpy(np.array(out[0]))  # [n, H, W, 3]


def _dali_to_torch_cuda(tensor, device_id: int) -> torch.Tensor:
    """A DALI ``TensorGPU`` as a torch CUDA tensor (``feed_ndarray``: a device-to-device copy on torch's
    current stream, so later torch work on that stream is ordered after it)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    out = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=torch.device("cuda", device_id))
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out
