"""Frame sources: given a probed file and sorted frame indices, yield those frames as RGB uint8.

Each ``iter_frames_*`` is a generator of chunks ``[n, H, W, 3]`` uint8 (full resolution, a few frames
at a time) in index order, covering exactly the requested indices. The caller resizes each chunk as it
arrives, so at most one chunk of full-resolution frames is alive at once. A stream that ends before
the last requested index raises ``StreamEndedEarly`` with the number of frames it did decode.

PyAV seeks to keyframes where the sampled frames are far apart, so a request's decoding cost follows
the frames it asks for, not the video's length; frames are identified by pts, and its frames are the
sequential decoder's, bit for bit (``iter_frames_pyav``).

decord and DALI are imported inside their functions; importing this module imports neither.
"""

from __future__ import annotations

import array
import dataclasses
import importlib
import itertools
from collections.abc import Iterator

import numpy as np
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


SEEK_MIN_GAP = 16
"""PyAV seeks only where that skips decoding more than this many frames (see ``iter_frames_pyav``). A
seek costs what decoding 3.5 to 5.5 frames does (H.264 at 64 and 256 px, frame-threaded: the frames in
flight are drained, the keyframe decoded, the threads refilled); sixteen leaves a margin for slower
storage and larger keyframes."""


@dataclasses.dataclass(frozen=True)
class FrameTable:
    """A stream's frames in presentation order, read from its packets (demuxed, not decoded)."""

    pts: np.ndarray
    """[N] int64, strictly ascending: ``pts[i]`` is the pts of frame ``i``."""
    keyframes: np.ndarray
    """[K] int64, ascending: the indices of the frames whose packets are keyframes."""
    open_gop: bool = False
    """Some packet after a keyframe (in decoding order) is shown before it: leading frames of an open GOP,
    which a decoder that seeks to that keyframe cannot rebuild."""

    def index_of(self, pts: int | None) -> int | None:
        """Index of the frame with this pts, or None if no frame has it."""
        if pts is None:
            return None
        i = int(np.searchsorted(self.pts, pts))
        return i if i < len(self.pts) and self.pts[i] == pts else None

    def keyframe_at_or_before(self, index: int) -> int | None:
        k = int(np.searchsorted(self.keyframes, index, side="right")) - 1
        return int(self.keyframes[k]) if k >= 0 else None


def frame_table(path: str, num_frames: int) -> FrameTable | None:
    """The presentation order of ``path``'s first video stream from one demuxing pass, or None where the
    packets cannot name every frame exactly: a packet without a pts, two packets with one pts, a count
    other than ``num_frames`` (the probe's, which sequential decoding checks), or a demuxing error.

    Frame ``i`` of sequential decoding is the ``i``-th frame the decoder outputs, which for a stream whose
    packets each decode to one frame is the packet with the ``i``-th smallest pts: B-frames (decode order
    differs from display order), a first pts other than 0 and variable frame rate all keep this. Packets
    the container marks as discarded (an edit list) produce no frame and are left out.
    """
    import av

    pts, keys = array.array("q"), array.array("q")  # int64 without a Python object per packet
    open_gop, last_key = False, None
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:
                    continue
                if packet.pts is None:
                    return None
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keys.append(packet.pts)
                    last_key = packet.pts
                elif last_key is not None and packet.pts < last_key:
                    open_gop = True
    except av.error.FFmpegError:
        return None
    # A stream that does not open on a keyframe shown first (a clip cut mid-GOP, open-GOP leading
    # frames at the start) decodes to fewer frames than it has packets: its indices need the decoder.
    if len(pts) != num_frames or not keys or keys[0] != pts[0]:
        return None
    order = np.sort(np.frombuffer(pts, dtype=np.int64))  # [N]
    if order[0] != pts[0] or np.any(order[1:] == order[:-1]):
        return None
    keyframes = np.searchsorted(order, np.sort(np.frombuffer(keys, dtype=np.int64)))  # [K]
    return FrameTable(pts=order, keyframes=keyframes.astype(np.int64), open_gop=open_gop)


def largest_skip(indices: list[int]) -> int:
    """The most frames a decoder passes over between two wanted ones (or before the first)."""
    return max([indices[0]] + [b - a - 1 for a, b in zip(indices, indices[1:])])


def iter_frames_pyav(info, indices: list[int], *, chunk_size: int = 8, seek: bool = True,
                     min_seek_gap: int = SEEK_MIN_GAP, table: FrameTable | None | bool = None) -> Iterator[torch.Tensor]:
    """Decode with PyAV; only sampled frames are converted to RGB and kept.

    With ``seek`` (the default) decoding jumps ahead: where the keyframe at or before the next wanted
    frame lies more than ``min_seek_gap`` frames beyond the decoder's position, the demuxer seeks to that
    keyframe and decoding resumes there (otherwise it decodes on through), so the work follows the
    frames sampled, not the video's length. Frames are identified by pts against a ``frame_table`` (one
    demuxing pass, no decoding), so every index means what it means in sequential decoding; after a
    seek each frame must carry the pts the table gives the next index, and frames shown before the
    keyframe sought to (open-GOP leading frames) are dropped, so the frames are the sequential
    decoder's bit for bit, given that the container's keyframes are points decoding can start from.
    Sequential decoding is used where seeking could not skip more than ``min_seek_gap`` frames anyway,
    where the table cannot be made exact (see ``frame_table``), and for the rest of a request whenever
    what the decoder outputs after a seek does not match the table. ``table``: the stream's
    ``frame_table`` if the caller has it already (``False``: it is known not to exist), so several
    requests on one file demux it once.
    """
    if not indices:
        return
    if not seek or largest_skip(indices) <= min_seek_gap or table is False:
        table = None
    elif table is None:
        table = frame_table(info.path, info.num_frames)
    if table is None:
        yield from _iter_sequential(info, indices, chunk_size)
        return
    done = 0
    try:
        for chunk in _iter_seeking(info, indices, table, chunk_size, min_seek_gap):
            done += chunk.shape[0]
            yield chunk
    except _NotExact:
        yield from _iter_sequential(info, indices[done:], chunk_size)


def _iter_sequential(info, indices: list[int], chunk_size: int) -> Iterator[torch.Tensor]:
    import av

    buf = []
    pos = 0
    index = -1
    to_rgb = _RGB()
    with av.open(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index != indices[pos]:
                    continue
                buf.append(to_rgb(frame))  # [H, W, 3]
                pos += 1
                if len(buf) == chunk_size or pos == len(indices):
                    yield torch.stack(buf)  # [n, H, W, 3]
                    buf = []
                if pos == len(indices):
                    return
        except av.error.FFmpegError as e:
            raise VideoDecodeError(info.path, f"corrupt stream after frame {index}: {e.strerror}") from None
    raise StreamEndedEarly(index + 1)


class _RGB:
    """Frame -> ``[H, W, 3]`` uint8 tensor through one swscale context for the whole request:
    ``VideoFrame.to_ndarray(format=...)`` builds a new one per frame (about 0.5 ms, more than the
    conversion of a small frame); the pixels are the same."""

    def __init__(self):
        from av.video.reformatter import VideoReformatter

        self._reformatter = VideoReformatter()

    def __call__(self, frame) -> torch.Tensor:
        return torch.from_numpy(self._reformatter.reformat(frame, format="rgb24").to_ndarray())


class _NotExact(Exception):
    """After a seek the decoder's frames did not match the frame table: finish sequentially."""


def _decoded(packets) -> Iterator:
    for packet in packets:
        yield from packet.decode()  # the last, empty packet flushes the decoder


def _seek(container, stream, table: FrameTable, key: int):
    """Seek to keyframe ``key`` (a frame index); returns ``(first frame index, packets from there)``.

    Demuxers find the seek point by their own timestamps (MP4: decode times shifted by an edit list),
    so a seek may land on an earlier keyframe, which only costs time; landing anywhere else (a later
    frame, a frame the table does not know) is retried from the keyframe before, then given up on."""
    for _ in range(3):
        container.seek(int(table.pts[key]), stream=stream, backward=True, any_frame=False)
        packets = container.demux(stream)
        first = next((p for p in packets if p.size > 0), None)
        landed = table.index_of(first.pts) if first is not None else None
        if landed is not None and landed <= key and first.is_keyframe:
            return landed, itertools.chain([first], packets)
        key = table.keyframe_at_or_before(key - 1) if key > 0 else None
        if key is None:
            break
    raise _NotExact


def _iter_seeking(info, indices: list[int], table: FrameTable, chunk_size: int,
                  min_seek_gap: int) -> Iterator[torch.Tensor]:
    import av

    buf = []
    pos = 0
    pts = table.pts
    to_rgb = _RGB()
    with av.open(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = None  # decoded frames from where decoding last (re)started
        expect = 0  # index the decoder's next frame must have
        floor = None  # pts of the keyframe sought to: frames shown before it (open-GOP leading frames) are dropped
        try:
            while pos < len(indices):
                target = indices[pos]
                key = table.keyframe_at_or_before(target)
                if key is not None and key - expect > min_seek_gap:
                    expect, packets = _seek(container, stream, table, key)
                    frames, floor = _decoded(packets), int(pts[expect])
                elif frames is None:
                    frames = _decoded(container.demux(stream))
                for frame in frames:  # resumes where the previous target's loop stopped
                    frame_pts = frame.pts
                    if floor is not None and frame_pts is not None and frame_pts < floor:
                        continue
                    if frame_pts != pts[expect]:  # expect <= target < len(pts) here
                        raise _NotExact
                    expect += 1
                    if expect > target:
                        break
                else:
                    raise _NotExact  # the stream ended before the table did
                buf.append(to_rgb(frame))  # [H, W, 3]
                pos += 1
                if len(buf) == chunk_size or pos == len(indices):
                    yield torch.stack(buf)  # [n, H, W, 3]
                    buf = []
        except av.error.FFmpegError as e:
            raise VideoDecodeError(info.path, f"corrupt stream near frame {expect}: {e.strerror}") from None


def iter_frames_decord(info, indices: list[int], *, chunk_size: int = 8) -> Iterator[torch.Tensor]:
    """Fetch frames with decord's ``get_batch``, a few indices per call. decord 0.6 seeks into an open GOP
    inexactly (frames up to 3 indices late), so a stream with open GOPs (``FrameTable.open_gop``, one
    demuxing pass) is decoded by the seeking PyAV path instead, which returns the exact frames."""
    table = frame_table(info.path, info.num_frames) if indices else None
    if table is not None and table.open_gop:
        yield from iter_frames_pyav(info, indices, chunk_size=chunk_size)
        return
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
        importlib.import_module("nvidia.dali")
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
