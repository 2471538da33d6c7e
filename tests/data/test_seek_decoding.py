"""PyAV's seeking path returns the sequential decoder's frames, bit for bit, on the streams that make
seeking hard: every GOP size, B-frames, open GOPs, a first pts other than 0, variable frame rate, VP9."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
import torch

from megatron_longvideo.data import backends
from megatron_longvideo.data.sampling import FrameSamplingConfig, sample_frame_indices
from megatron_longvideo.data.video import decode_video, probe_video

from .conftest import index_frame, read_index, requires_decord


def _x264(params: str) -> dict:
    return {"preset": "ultrafast", "x264-params": f"scenecut=0:{params}"}


# name: (frames, container format, encoder, options, pts of frame i in 1/1000 s or None for 30 fps)
STREAMS = {
    "gop1": (60, "mp4", "libx264", _x264("keyint=1"), None),
    "gop12_bframes": (150, "mp4", "libx264", _x264("keyint=12:min-keyint=12:bframes=3:b-adapt=0"), None),
    "gop12_open_bframes": (150, "mp4", "libx264", _x264("keyint=12:min-keyint=12:bframes=3:b-adapt=0:open-gop=1"), None),
    "gop250": (600, "mp4", "libx264", _x264("keyint=250"), None),
    "start_5s_mkv": (120, "matroska", "libx264", _x264("keyint=12:min-keyint=12"), lambda i: 5000 + 33 * i),
    "start_5s_mp4_bframes": (120, "mp4", "libx264", _x264("keyint=12:min-keyint=12:bframes=2"), lambda i: 5000 + 33 * i),
    "vfr_bframes": (120, "mp4", "libx264", _x264("keyint=12:min-keyint=12:bframes=2"),
                    lambda i: int(np.cumsum(np.random.default_rng(0).integers(10, 80, 120))[i])),
    "vp9_gop12": (90, "webm", "libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "g": "12"}, None),
}


def _write(path: str, name: str) -> None:
    import av

    num_frames, fmt, encoder, options, pts_of = STREAMS[name]
    with av.open(path, mode="w", format=fmt) as container:
        stream = container.add_stream(encoder, rate=Fraction(30), options=options)
        stream.pix_fmt, stream.width, stream.height = "yuv420p", 64, 64
        if pts_of is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")
            if pts_of is not None:
                frame.pts, frame.time_base = pts_of(i), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    root = tmp_path_factory.mktemp("seek_streams")
    paths = {}
    for name in STREAMS:
        paths[name] = os.path.join(root, f"{name}.{ {'matroska': 'mkv'}.get(STREAMS[name][1], STREAMS[name][1]) }")
        _write(paths[name], name)
    return paths


@pytest.fixture
def spy(monkeypatch):
    """Counts seeks and sequential passes of the PyAV backend."""
    calls = {"seek": 0, "sequential": []}
    seek, sequential = backends._seek, backends._iter_sequential

    def counting_seek(*args, **kwargs):
        calls["seek"] += 1
        return seek(*args, **kwargs)

    def counting_sequential(info, indices, chunk_size):
        calls["sequential"].append(list(indices))
        return sequential(info, indices, chunk_size)

    monkeypatch.setattr(backends, "_seek", counting_seek)
    monkeypatch.setattr(backends, "_iter_sequential", counting_sequential)
    return calls


def _frames(info, indices, **kwargs) -> torch.Tensor:
    return torch.cat(list(backends.iter_frames_pyav(info, indices, **kwargs)))  # [n, H, W, 3]


def _requests(n: int) -> list[list[int]]:
    return [[0, n - 1], [n - 1], [n // 2], [1, 2, 3, n - 2, n - 1], list(range(5, n, 7)), [0, 13, 14, 15, n // 3, n - 1]]


@pytest.mark.parametrize("name", list(STREAMS))
def test_seeking_returns_the_sequential_frames(streams, name, spy):
    """Index lists with first, last, isolated and consecutive frames, seeking at every chance
    (``min_seek_gap=0``): the frames equal sequential decoding's bit for bit and show their own index;
    the seeking path really seeks and never falls back."""
    info = probe_video(streams[name])
    n = STREAMS[name][0]
    assert info.num_frames == n
    for indices in _requests(n):
        want = _frames(info, indices, seek=False)
        spy["sequential"].clear()
        seeks = spy["seek"]
        got = _frames(info, indices, min_seek_gap=0)
        assert spy["sequential"] == [] and spy["seek"] > seeks, (name, indices)  # each request has a far frame
        assert torch.equal(got, want), (name, indices)
        assert [read_index(f.permute(2, 0, 1)) for f in got] == indices, (name, indices)


@pytest.mark.parametrize("name", ["gop12_bframes", "gop250", "start_5s_mkv", "vfr_bframes", "vp9_gop12"])
@pytest.mark.parametrize("cfg", [FrameSamplingConfig(num_frames=12, image_size=64),
                                 FrameSamplingConfig(num_frames=None, fps=2.0, max_frames=64, image_size=64)])
def test_decode_video_with_and_without_seeking(streams, name, cfg):
    """Uniform and rate sampling through ``decode_video``, at the default seek rule: same indices, same
    timestamps, the same frames bit for bit, each showing its index."""
    a = decode_video(streams[name], cfg, seek=False)
    b = decode_video(streams[name], cfg)
    assert b.indices == a.indices == sample_frame_indices(a.info.num_frames, a.info.fps, cfg)
    assert b.timestamps == a.timestamps
    assert torch.equal(b.frames, a.frames)
    assert [read_index(f) for f in b.frames] == b.indices


def test_the_table_is_the_decoders_presentation_order(streams):
    """With B-frames decode order is not display order: the table's i-th pts is the pts of the i-th
    frame sequential decoding outputs; keyframes are where the encoder put them."""
    import av

    path = streams["gop12_bframes"]
    table = backends.frame_table(path, 150)
    with av.open(path) as container:
        decoded = [f.pts for f in container.decode(video=0)]
    assert table.pts.tolist() == decoded
    assert table.keyframes.tolist() == list(range(0, 150, 12))
    assert backends.frame_table(path, 149) is None  # a count other than the probe's: not exact


def test_far_apart_frames_only_build_a_table(streams, spy, monkeypatch):
    """Where no gap exceeds ``min_seek_gap`` decoding is sequential and no frame table is built."""
    def no_table(*args):
        raise AssertionError("frame_table called for a dense request")

    info = probe_video(streams["gop12_bframes"])
    dense = list(range(0, 150, backends.SEEK_MIN_GAP))
    monkeypatch.setattr(backends, "frame_table", no_table)
    got = _frames(info, dense)
    assert spy["sequential"] == [dense] and spy["seek"] == 0
    assert [read_index(f.permute(2, 0, 1)) for f in got] == dense


def test_a_table_that_does_not_match_falls_back_to_sequential(streams, spy, monkeypatch):
    """A frame table whose pts the decoder does not produce (here: the second half shifted by one tick)
    is noticed after the seek; the frames already returned stand and the rest come sequentially."""
    path = streams["gop12_bframes"]
    info = probe_video(path)
    table = backends.frame_table(path, 150)
    pts = table.pts.copy()
    pts[75:] += 1
    monkeypatch.setattr(backends, "frame_table", lambda *a: backends.FrameTable(pts=pts, keyframes=table.keyframes))
    indices = [5, 30, 100, 140]
    got = _frames(info, indices, chunk_size=1, min_seek_gap=0)
    assert spy["sequential"] == [[100, 140]]
    assert torch.equal(got, _frames(info, indices, seek=False))


@requires_decord
@pytest.mark.parametrize("name", ["gop12_bframes", "start_5s_mkv", "start_5s_mp4_bframes", "vfr_bframes", "gop250"])
def test_decord_equals_seeking_pyav(streams, name):
    """decord's ``get_batch`` seeks on its own: on closed-GOP streams it returns PyAV's frames exactly."""
    info = probe_video(streams[name])
    for indices in _requests(info.num_frames):
        want = _frames(info, indices, min_seek_gap=0)
        assert torch.equal(torch.cat(list(backends.iter_frames_decord(info, indices))), want), (name, indices)


@requires_decord
def test_decord_on_open_gop(streams):
    """decord 0.6 seeks into open-GOP H.264 inexactly (a frame up to 3 indices late): such a stream is
    recognised from its packets and the decord backend hands it to the seeking PyAV path."""
    info = probe_video(streams["gop12_open_bframes"])
    assert backends.frame_table(info.path, info.num_frames).open_gop
    assert not any(backends.frame_table(streams[n], probe_video(streams[n]).num_frames).open_gop
                   for n in ("gop12_bframes", "gop250"))
    indices = [50, 60, 70, 80, info.num_frames - 1]
    assert torch.equal(torch.cat(list(backends.iter_frames_decord(info, indices))), _frames(info, indices))
