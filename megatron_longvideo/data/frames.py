"""A video's sampled frames, probed once and decoded only where they are needed (frame-sharded decoding).

``LazyFrames`` stands where a ``[T, 3, H, W]`` frames tensor stands in a sample: it knows the shape, the
frame indices and timestamps (from one probe), and decodes a frame the first time someone asks for it,
keeping the resized uint8 frame for the next ask. Parallel encoding
(:func:`megatron_longvideo.models.encode.encode_videos`) asks each rank of the encode group for its own
slice of every video only (:func:`frame_shard`), so a group of E ranks decodes each frame once, on the
rank that encodes it, instead of every rank decoding the whole video; a video whose embedding the cache
serves is never decoded at all. A prefetching consumer decodes this rank's slice ahead of time in a
worker (:meth:`LazyFrames.decode_shard`), and the encoder then finds it done. The probe and the stream's
packet table can be made once for the whole group too (:mod:`~megatron_longvideo.data.probe_cache`).

The frames equal ``decode_video``'s bit for bit (the same backend call on a subset of the same indices,
the same resize and normalisation); views (``frames[positions]``, as ``--rollout-max-frames`` takes)
share the decoded frames and the stream's packet table. Objects pickle (DataLoader workers), decoded
frames included.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_longvideo.data.errors import VideoDecodeError
from megatron_longvideo.data.sampling import FrameSamplingConfig, frame_timestamps

__all__ = ["FrameShard", "LazyFrames", "agree_on_shard_errors", "as_tensor", "frame_shard", "is_lazy", "settle_shard_error", "shard_failure"]


def frame_shard(num_frames: int, group_size: int, rank: int, unit: int = 1) -> tuple[int, int, int]:
    """``(units per rank, first frame, end frame)`` of rank ``rank``'s slice of a ``num_frames`` video.

    The video is cut into units of ``unit`` frames (the last may be short: Qwen2.5-VL repeats an odd last
    frame), the units into ``group_size`` contiguous slices of ``ceil(units / group_size)`` units, the
    last slices padded with blank units; the frame range may be empty for a rank past the end."""
    if group_size < 1 or not 0 <= rank < group_size or unit < 1 or num_frames < 0:
        raise ValueError(f"frame_shard: bad arguments num_frames={num_frames}, group_size={group_size}, "
                         f"rank={rank}, unit={unit}")
    units = -(-num_frames // unit)
    per_rank = -(-units // group_size)
    start = min(rank * per_rank * unit, num_frames)
    stop = min((rank + 1) * per_rank * unit, num_frames)
    return per_rank, start, stop


@dataclasses.dataclass(frozen=True)
class FrameShard:
    """Which slice of each video this rank encodes: ``rank`` of an encode group of ``size``, in units of
    ``unit`` frames (:func:`frame_shard`)."""

    rank: int = 0
    size: int = 1
    unit: int = 1

    def __post_init__(self):
        frame_shard(0, self.size, self.rank, self.unit)  # validates

    def frames_of(self, num_frames: int) -> tuple[int, int]:
        """``(first frame, end frame)`` of this rank's slice."""
        _, start, stop = frame_shard(num_frames, self.size, self.rank, self.unit)
        return start, stop


class _Store:
    """Decoded frames of one video by frame index, shared by a ``LazyFrames`` and its views: one uint8
    tensor per decode request (``[n, 3, h, w]``, a contiguous block), so a sample sent from a worker
    process shares a few blocks, not one file descriptor per frame, and a rank holds only what it decoded."""

    def __init__(self, table=None, probed: bool = True):
        self.blocks: list[torch.Tensor] = []  # [n, 3, h, w] uint8 each
        self.where: dict[int, tuple[int, int]] = {}  # frame index -> (block, row)
        self.table = table  # the stream's packet table (pyav): given, or built by the first decode that seeks
        self.decoded = 0  # frames decoded so far (a frame decoded twice counts twice; it never is)
        # Work on the file itself that this process did for this video, so a test can tell a shared probe
        # (data/probe_cache.py) from a rank's own: 0 or 1 each.
        self.num_probes = int(probed)
        self.num_tables_built = 0

    def __contains__(self, index: int) -> bool:
        return index in self.where

    def frame(self, index: int) -> torch.Tensor:
        block, row = self.where[index]
        return self.blocks[block][row]

    def add(self, indices: list[int], frames: torch.Tensor) -> None:
        self.blocks.append(frames)
        block = len(self.blocks) - 1
        for row, index in enumerate(indices):
            self.where[index] = (block, row)


class LazyFrames:
    """Normalised frames ``[T, 3, h, w]`` float32 of one video, decoded on demand (see the module docstring).

    Tensor-like where samples are inspected: ``shape``, ``dim()``, ``dtype``, ``is_floating_point()``,
    ``len()``; ``frames[positions]`` (a list, tensor or slice) is a view on those positions. Real
    frames come from :meth:`frames` (a range), :meth:`materialize` (all) or :func:`as_tensor`.
    """

    dtype = torch.float32

    def __init__(self, info, indices, size: tuple[int, int], config: FrameSamplingConfig, backend: str, *,
                 context: str | None = None, table=None, probed: bool = True, _store: _Store | None = None):
        """``info``, ``indices`` and ``size`` come from a probe (:func:`~megatron_longvideo.data.video.probe_lazy`).
        ``table``: the stream's packet table if known already (a ``FrameTable``, or False: it cannot be
        made), and ``probed=False`` where this process did not probe the file itself: both are how a
        probe shared by the encode group (:mod:`~megatron_longvideo.data.probe_cache`) arrives."""
        self.info = info
        self.indices = tuple(int(i) for i in indices)
        if any(b <= a for a, b in zip(self.indices, self.indices[1:])):
            raise ValueError(f"{info.path}: frame indices must be strictly increasing, got {self.indices[:8]}...")
        self.size = (int(size[0]), int(size[1]))
        self.config = config
        self.backend = backend
        self.context = context
        self._store = _store if _store is not None else _Store(table, probed)

    # -- what a sample's consumers read without decoding
    @property
    def path(self) -> str:
        return self.info.path

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.indices), 3, *self.size))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def dim(self) -> int:
        return 4

    def is_floating_point(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def timestamps(self) -> list[float]:
        return frame_timestamps(list(self.indices), self.info.fps)

    @property
    def num_decoded(self) -> int:
        """Frames of this video decoded so far (by this object and its views, in this process)."""
        return self._store.decoded

    @property
    def packet_table(self):
        """The stream's packet table if known (a ``FrameTable``, or False: it cannot be made); None if not
        built yet (see :meth:`frame_table`)."""
        return self._store.table

    @property
    def num_probes(self) -> int:
        """Probes of the file made in this process for this video: 1, or 0 where the probe was shared."""
        return self._store.num_probes

    @property
    def num_tables_built(self) -> int:
        """Demuxing passes over the whole file (the packet table) made in this process for this video: 0
        where the table came with a shared probe or no request sought."""
        return self._store.num_tables_built

    def decoded_positions(self) -> list[int]:
        """Positions whose frames are decoded and kept."""
        return [p for p, i in enumerate(self.indices) if i in self._store]

    def __getitem__(self, key):
        """A view on the positions ``key`` selects (a slice, list or tensor of positions); an int gives that
        frame itself, ``[3, h, w]`` float32, as a tensor would."""
        if isinstance(key, int):
            position = range(len(self.indices))[key]
            return self.frames(position, position + 1)[0]
        if isinstance(key, slice):
            positions = range(len(self.indices))[key]
        elif isinstance(key, torch.Tensor):
            positions = key.tolist()
        else:
            positions = list(key)
        return LazyFrames(self.info, [self.indices[p] for p in positions], self.size, self.config, self.backend,
                          context=self.context, _store=self._store)

    def __repr__(self) -> str:
        done = len(self.decoded_positions())
        return f"LazyFrames({self.path!r}, shape={tuple(self.shape)}, decoded {done}/{len(self)})"

    # -- decoding
    def ensure(self, start: int = 0, stop: int | None = None) -> None:
        """Decode the frames of positions ``[start, stop)`` not decoded yet (one backend request)."""
        stop = len(self.indices) if stop is None else stop
        missing = [i for i in self.indices[start:stop] if i not in self._store]
        if missing:
            self._decode(missing)

    def decode_shard(self, shard: FrameShard) -> None:
        """Decode this rank's slice (:class:`FrameShard`) now, e.g. in a prefetch worker."""
        self.ensure(*shard.frames_of(len(self.indices)))

    def uint8(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``[n, 3, h, w]`` uint8 resized frames of positions ``[start, stop)``, decoding what is missing."""
        self.ensure(start, stop)
        stop = len(self.indices) if stop is None else stop
        chosen = self.indices[start:stop]
        if not chosen:
            return torch.empty(0, 3, *self.size, dtype=torch.uint8, device="cpu")
        return torch.stack([self._store.frame(i) for i in chosen])

    def frames(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``[n, 3, h, w]`` float32 normalised frames of positions ``[start, stop)`` (as ``decode_video``)."""
        from megatron_longvideo.data.video import normalize_frames

        return normalize_frames(self.uint8(start, stop).float(), self.config)

    def materialize(self) -> torch.Tensor:
        """All frames, ``[T, 3, h, w]`` float32 normalised."""
        return self.frames()

    def frame_table(self):
        """The stream's packet table (pyav, one demuxing pass over the whole file), built now if not yet:
        a ``FrameTable``, or False where the packets cannot name every frame (decoding then runs
        sequentially). Whoever probes for the encode group builds it once for every rank."""
        from megatron_longvideo.data import backends

        store = self._store
        if store.table is None:
            store.table = backends.frame_table(self.path, self.info.num_frames) or False
            store.num_tables_built += 1
        return store.table

    def _decode(self, wanted: list[int]) -> None:
        from megatron_longvideo.data import backends
        from megatron_longvideo.data.backends import StreamEndedEarly
        from megatron_longvideo.data.video import resize_frames

        store = self._store
        mode = "bicubic" if self.config.style == "qwen_vl" else "bilinear"
        if self.backend == "pyav":
            if store.table is None and backends.largest_skip(wanted) > backends.SEEK_MIN_GAP:
                self.frame_table()
            chunks = backends.iter_frames_pyav(self.info, wanted, table=store.table)
        elif self.backend == "decord":
            chunks = backends.iter_frames_decord(self.info, wanted)
        elif self.backend == "dali":
            chunks = backends.iter_frames_dali(self.info, wanted)
        else:
            raise ValueError(f"unknown backend {self.backend!r}")
        pos, out = 0, None  # out: [len(wanted), 3, h, w] uint8, one block for the whole request
        try:
            for chunk in chunks:  # [n, H, W, 3] uint8
                resized = resize_frames(chunk, self.size, mode=mode)  # [n, 3, h, w]
                if out is None:
                    out = torch.empty(len(wanted), *resized.shape[1:], dtype=torch.uint8, device=resized.device)
                n = min(resized.shape[0], len(wanted) - pos)
                out[pos : pos + n] = resized[:n]
                pos += n
        except StreamEndedEarly as short:
            raise VideoDecodeError(
                self.path, f"truncated or corrupt: the container declares {self.info.num_frames} frames but the "
                           f"stream ended after {short.num_decoded} (frame-sharded decoding keeps the probed "
                           f"indices; decode='full' with strict_frame_count=False resamples)",
                context=self.context) from None
        except VideoDecodeError as e:
            if self.context and not e.context:
                raise VideoDecodeError(e.path, e.reason, context=self.context) from None
            raise
        if pos != len(wanted):
            raise VideoDecodeError(self.path, f"the decoder returned {pos} of the {len(wanted)} frames asked for",
                                   context=self.context)
        store.add(wanted, out)
        store.decoded += pos

    # -- pickling: the store (decoded frames, packet table) travels with the object
    def __getstate__(self):
        return {"info": self.info, "indices": self.indices, "size": self.size, "config": self.config,
                "backend": self.backend, "context": self.context, "_store": self._store}

    def __setstate__(self, state):
        self.__dict__.update(state)


def is_lazy(frames) -> bool:
    return isinstance(frames, LazyFrames)


def as_tensor(frames) -> torch.Tensor:
    """``frames`` as a real ``[T, 3, h, w]`` tensor (a ``LazyFrames`` is decoded whole)."""
    return frames.materialize() if isinstance(frames, LazyFrames) else frames


def shard_failure(error: tuple[str, str]) -> VideoDecodeError:
    """The ``VideoDecodeError`` of an agreed ``(path, message)`` (:func:`agree_on_shard_errors`)."""
    path, message = error
    return VideoDecodeError(path, message.split(": cannot decode video: ", 1)[-1])


def settle_shard_error(error: tuple[str, str], on_error: str, report) -> None:
    """What every rank does with an agreed slice failure: raise it (``on_error="raise"``) or count it in
    ``report`` (a :class:`~megatron_longvideo.data.errors.SkipReport`)."""
    if on_error == "raise":
        raise shard_failure(error)
    report.add_video_errors([error])


def agree_on_shard_errors(errors, group=None) -> list:
    """Every rank of ``group`` (the ranks holding the same samples) learns which samples failed to decode
    on any of them: ``errors[i]`` is this rank's ``(path, message)`` for sample ``i`` or None, and the
    result is the same list on every rank, the message being the first failing rank's. One small
    all-reduce; the messages travel (``all_gather_object``) only when something failed. A single
    process (no group, or a group of one) gets its own list back."""
    import torch.distributed as dist

    errors = list(errors)
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1 or not errors:
        return errors
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flags = torch.tensor([0 if e is None else 1 for e in errors], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    failed = flags.tolist()
    if not any(failed):
        return errors
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, errors, group=group)
    out = []
    for i, bad in enumerate(failed):
        if not bad:
            out.append(None)
            continue
        rank, (path, message) = next((r, e[i]) for r, e in enumerate(gathered) if e[i] is not None)
        out.append((path, f"{message} [on rank {rank} of the group, decoding its share of the frames]"))
    return out
