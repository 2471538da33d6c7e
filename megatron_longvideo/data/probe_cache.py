"""One probe per video per encode group: rank 0 of the group probes, the others read what it published.

Frame-sharded decoding (:mod:`~megatron_longvideo.data.frames`) splits a video's decoding over the E ranks
of an encode group, but every rank still probed the file and built its packet table (one demuxing pass
over the whole file) for itself: a fixed cost that does not shrink with E. Here the group's rank 0
(``FrameShard.rank == 0``) probes, builds the table if any rank's slice will seek, and publishes the
result (stream metadata, sampled indices, frame size, packet table) into a folder the group shares; the
other ranks read it instead of opening the file. A later epoch finds the entry and no rank demuxes.

Correctness never depends on timing. An entry holds exactly what a fresh probe computes (the same
functions on the same bytes), so a rank that reads it, one that waited for it, and one that gave up
waiting and probed itself all hold the same ``LazyFrames``, decoding the same frames bit for bit. No
collectives are involved (probing happens in DataLoader workers), so nothing can hang: a rank other
than 0 polls for at most ``wait_s`` seconds, then probes itself and publishes too.

Entries are keyed like the frame cache (:func:`~megatron_longvideo.data.cache.cache_key`: absolute
path, size, mtime, sampling, backend) and also record the file's size and mtime, checked again on read,
so a changed file is probed afresh. An entry that cannot be read or does not hold what is expected is
a miss, never an error. Writes are atomic (a temporary file, then ``os.replace``). An entry is one line
of JSON (the metadata and indices) followed by the packet table as raw little-endian int64: nothing in
it runs code, and reading it takes a fraction of a millisecond (``torch.load(weights_only=True)`` of the
same took about 5 ms, more than probing an MP4's header). A file whose probe failed is published as a
failure, so the group reports it with the same message at once.

The folder must be shared by the group's ranks: the frame cache dir, or a per-run folder such as a
node-local temporary dir when the group (TP x CP) sits on one node. A group spread over nodes with a
node-local folder stays correct; its other nodes' ranks wait ``wait_s`` per new video, then probe.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from fractions import Fraction

import numpy as np

from megatron_longvideo.data.cache import cache_key
from megatron_longvideo.data.errors import VideoDecodeError
from megatron_longvideo.data.frames import FrameShard, LazyFrames
from megatron_longvideo.data.sampling import FrameSamplingConfig

__all__ = ["DEFAULT_WAIT_S", "group_seeks", "probe_shared", "publish", "read_entry"]

DEFAULT_WAIT_S = 10.0
"""How long a rank other than 0 waits for the group's probe. Rank 0's probe and packet table take 0.07 s
for a 10-minute 30 fps video on a CPU (docs/results/decode_sharded_cpu.md), so about 0.4 s for an hour;
the rest is slack for ranks whose loaders drift apart. Waiting in vain costs time, never correctness."""

_VERSION = 1
_INT64 = np.dtype("<i8")  # the table's bytes on disk, whatever the machine's byte order


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _entry_path(probe_dir: str, key: str) -> str:
    return os.path.join(probe_dir, key + ".probe")


def _bad_path(probe_dir: str, key: str) -> str:
    return os.path.join(probe_dir, key + ".probe.bad.json")


def _atomic_write(path: str, write) -> None:
    # pid plus a random part: two writers of one entry (rank 0 and a rank that gave up waiting) never
    # share a temporary file; their contents are equal, so whichever replace lands last is fine
    tmp = f"{path}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def group_seeks(indices, shard: FrameShard | None) -> bool:
    """Whether some rank's slice of ``indices`` will seek (so needs the packet table): the test
    ``LazyFrames`` applies to a request, applied to each rank's slice (``shard=None``: one rank, all)."""
    from megatron_longvideo.data.backends import SEEK_MIN_GAP, largest_skip

    shard = shard or FrameShard()
    for rank in range(shard.size):
        start, stop = FrameShard(rank=rank, size=shard.size, unit=shard.unit).frames_of(len(indices))
        if stop > start and largest_skip(list(indices[start:stop])) > SEEK_MIN_GAP:
            return True
    return False


def publish(probe_dir: str, key: str, frames: LazyFrames, stamp: tuple[int, int]) -> None:
    """Store ``frames``' probe (not its decoded frames) under ``key``, for the file version ``stamp``."""
    info, table = frames.info, frames.packet_table
    body = b""
    if table is not None and table is not False:
        body = table.pts.astype(_INT64).tobytes() + table.keyframes.astype(_INT64).tobytes()  # [N] then [K]
        table = {"num_frames": len(table.pts), "num_keyframes": len(table.keyframes), "open_gop": bool(table.open_gop)}
    header = {
        "version": _VERSION, "path": os.path.abspath(frames.path), "stamp": list(stamp), "backend": frames.backend,
        "info": {"num_frames": info.num_frames, "fps": [info.fps.numerator, info.fps.denominator],
                 "width": info.width, "height": info.height, "codec": info.codec},
        "indices": list(frames.indices), "size": list(frames.size),
        "table": table,  # the body's lengths, False (cannot be made) or None (not built)
    }
    blob = json.dumps(header).encode() + b"\n" + body

    def write(p):
        with open(p, "wb") as f:
            f.write(blob)

    os.makedirs(probe_dir, exist_ok=True)
    _atomic_write(_entry_path(probe_dir, key), write)


def _publish_bad(probe_dir: str, key: str, path: str, error: VideoDecodeError, stamp: tuple[int, int]) -> None:
    entry = {"version": _VERSION, "path": os.path.abspath(path), "stamp": list(stamp),
             "reason": error.reason or str(error)}

    def write(p):
        with open(p, "w") as f:
            json.dump(entry, f)

    os.makedirs(probe_dir, exist_ok=True)
    _atomic_write(_bad_path(probe_dir, key), write)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_entry(probe_dir: str, key: str, path: str, config: FrameSamplingConfig, backend: str,
               stamp: tuple[int, int]) -> LazyFrames | None:
    """The published probe of ``path`` as a fresh ``LazyFrames`` (nothing decoded, ``num_probes == 0``),
    or None: no entry, an entry for another version of the file, or one that cannot be read. Raises the
    published ``VideoDecodeError`` of a file whose probe failed."""
    from megatron_longvideo.data.backends import FrameTable
    from megatron_longvideo.data.video import VideoInfo

    want = [_VERSION, os.path.abspath(path), list(stamp)]
    bad = _read_json(_bad_path(probe_dir, key))
    if isinstance(bad, dict) and [bad.get("version"), bad.get("path"), bad.get("stamp")] == want:
        raise VideoDecodeError(path, str(bad.get("reason")))
    try:
        with open(_entry_path(probe_dir, key), "rb") as f:
            blob = f.read()
        line, body = blob.split(b"\n", 1)
        entry = json.loads(line)
        if [entry["version"], entry["path"], entry["stamp"]] != want or entry["backend"] != backend:
            return None
        meta, table = entry["info"], entry["table"]
        if table is None or table is False:
            if body:
                return None
        else:
            n, k = int(table["num_frames"]), int(table["num_keyframes"])
            words = np.frombuffer(body, dtype=_INT64).astype(np.int64)  # [N + K], a writable native copy
            if len(body) != _INT64.itemsize * (n + k) or n != int(meta["num_frames"]):
                return None
            table = FrameTable(pts=words[:n], keyframes=words[n:], open_gop=bool(table["open_gop"]))
        info = VideoInfo(path=os.fspath(path), num_frames=int(meta["num_frames"]),
                         fps=Fraction(int(meta["fps"][0]), int(meta["fps"][1])), width=int(meta["width"]),
                         height=int(meta["height"]), codec=str(meta["codec"]))
        indices = [int(i) for i in entry["indices"]]
        if not indices or indices[0] < 0 or indices[-1] >= info.num_frames:
            return None
        h, w = (int(x) for x in entry["size"])
        return LazyFrames(info, indices, (h, w), config, backend, table=table, probed=False)
    except Exception:  # a missing, partial, corrupt or foreign file: a miss, and whoever probes rewrites it
        return None


def probe_shared(path: str, config: FrameSamplingConfig, *, backend: str = "pyav", probe_dir: str | None,
                 shard: FrameShard | None = None, wait_s: float = DEFAULT_WAIT_S, poll_s: float = 0.02) -> LazyFrames:
    """What :func:`~megatron_longvideo.data.video.probe_lazy` returns, probed once per encode group.

    Reads the group's published probe from ``probe_dir`` if there is one. Otherwise rank 0 of ``shard``
    (or any caller without a shard, or with a group of one) probes, builds the packet table if some
    rank's slice will seek, and publishes; another rank polls every ``poll_s`` for at most ``wait_s``
    seconds, then probes and publishes itself. ``probe_dir=None``: a plain ``probe_lazy``."""
    from megatron_longvideo.data.video import probe_lazy

    stamp = _stamp(path)
    if probe_dir is None or stamp is None:  # no folder, or no file: the probe names the error
        return probe_lazy(path, config, backend=backend)
    key = cache_key(path, config, backend)
    frames = read_entry(probe_dir, key, path, config, backend, stamp)
    if frames is not None:
        return frames
    if shard is not None and shard.rank != 0:
        deadline = time.monotonic() + wait_s
        while frames is None and time.monotonic() < deadline:
            time.sleep(poll_s)
            frames = read_entry(probe_dir, key, path, config, backend, stamp)
        if frames is not None:
            return frames
        warnings.warn(f"{path}: rank {shard.rank} of the encode group waited {wait_s:g} s for rank 0's probe in "
                      f"{probe_dir} and probes itself (the same result); is the folder shared by the group?",
                      stacklevel=2)
    try:
        frames = probe_lazy(path, config, backend=backend)
    except VideoDecodeError as e:
        if _stamp(path) == stamp:
            _try(lambda e=e: _publish_bad(probe_dir, key, path, e, stamp), path, probe_dir)
        raise
    if backend == "pyav" and group_seeks(frames.indices, shard):
        frames.frame_table()
    if _stamp(path) == stamp:  # the file did not change while it was probed: the entry describes this version
        _try(lambda: publish(probe_dir, key, frames, stamp), path, probe_dir)
    return frames


def _try(write, path: str, probe_dir: str) -> None:
    """A folder that cannot be written (read-only, full) costs the sharing, not the sample."""
    try:
        write()
    except OSError as e:
        warnings.warn(f"{path}: cannot publish its probe in {probe_dir}: {e}", stacklevel=3)
