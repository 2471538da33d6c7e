"""The map-style dataset: record -> decoded frames + tokenized prompt (and target).

``LongVideoDataset[i]`` decodes the record's visual inputs (each video, or its frame cache entry, and each
image as a one-frame video; none for a text-only record), resolves each one's number of video tokens
from its frame count, and builds the example for its mode:

- ``pretrain``: caption records, "Describe the video." -> caption, loss on the caption.
- ``sft``: question records, response ``<think>reasoning</think><answer>answer</answer>``.
- ``rl``: question records, prompt only plus the ground truth for the reward.

Bad input never reaches a collective: every check runs here, inside ``__getitem__``, on the worker.
With ``on_error="raise"`` the first bad video raises ``VideoDecodeError`` naming the file and the
record. With ``"skip"`` the item is replaced by the next good one (``i+1``, ``i+2``, ... modulo the
length), so every DP rank still receives a full batch, and the sample carries the skipped messages in
``bad_inputs`` for the driver's ``SkipReport`` (the process that consumes samples, ``ResumableDataLoader``
or ``PromptStream``, adds them to ``dataset.skip_report``; ``__getitem__`` itself counts nothing, since
in a DataLoader worker it holds a copy). Bad records are dropped, counted and logged when the file is
read; if none is left, the error names the top reasons with an example each.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import torch

from megatron_longvideo.data import cache
from megatron_longvideo.data.audio import AudioSamplingConfig
from megatron_longvideo.data.errors import (
    OnError,
    SkipReport,
    VideoDecodeError,
    check_on_error,
    video_skip_reason,
)
from megatron_longvideo.data.prompts import (
    NumVideoTokens,
    PromptConfig,
    build_caption_example,
    build_rl_prompt,
    build_sft_example,
    resolve_num_video_tokens,
)
from megatron_longvideo.data.frames import FrameShard, is_lazy
from megatron_longvideo.data.records import load_records
from megatron_longvideo.data.sampling import FrameSamplingConfig, frame_timestamps
from megatron_longvideo.data.tokenizer import Tokenizer
from megatron_longvideo.data.probe_cache import probe_shared
from megatron_longvideo.data.video import BACKENDS, decode_image, decode_resized_uint8, decode_video, normalize_frames

MODES = ("pretrain", "sft", "rl")
DECODE_MODES = ("full", "lazy")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VideoDatasetConfig:
    """How a dataset turns records into samples."""

    mode: str = "rl"
    """``pretrain`` (caption records), ``sft`` or ``rl`` (question records)."""

    video_root: str
    """Folder the records' video paths are relative to."""

    sampling: FrameSamplingConfig = dataclasses.field(default_factory=FrameSamplingConfig)
    """Frame sampling, resizing and normalisation."""

    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    """Chat template text."""

    backend: str = "pyav"
    """Decoding backend: ``pyav``, ``decord`` or ``dali``."""

    on_error: OnError = "raise"
    """``raise`` on the first bad record or video, or ``skip`` it and count it."""

    max_consecutive_skips: int = 16
    """In skip mode, give up (raise) after this many bad videos in a row: the data is likely broken."""

    min_video_frames: int = 1
    """A video that yields fewer sampled frames than this is a bad video (``video: too few frames``)."""

    cache_dir: str | None = None
    """If set, decoded resized frames are cached here (see ``cache.predecode``)."""

    audio: AudioSamplingConfig = dataclasses.field(default_factory=AudioSamplingConfig)
    """How an audio input is decoded and featurised (records with ``audios``; its ``n_mels`` must be the
    audio tower's ``num_mel_bins``)."""

    decode: str = "full"
    """``full``: ``__getitem__`` decodes the sampled frames. ``lazy``: it probes the video and samples
    the indices only; the frames are a :class:`~megatron_longvideo.data.frames.LazyFrames`, decoded
    where they are used, each rank of an encode group decoding the frames it encodes (and, with
    ``LongVideoDataset.shard`` set, that slice already in ``__getitem__``). A frame cache entry
    (``cache_dir``) is still served whole; a miss is not written to it in this mode."""

    probe_dir: str | None = None
    """With ``decode="lazy"``: a folder the ranks of an encode group share (a node-local temporary dir
    will do when the group sits on one node), where the group's rank 0 publishes each video's probe
    (metadata, sampled indices, packet table) for the others to read instead of probing and demuxing
    the file themselves; a later epoch finds it and no rank demuxes
    (:mod:`~megatron_longvideo.data.probe_cache`). Default: ``cache_dir``; neither set, every rank probes."""

    probe_wait_s: float = 10.0
    """How long a rank other than 0 of the group waits for rank 0's probe before probing itself (the
    samples are the same either way)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.video_root:
            raise ValueError("video_root must be a folder path")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        check_on_error(self.on_error)
        if self.max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")
        if self.min_video_frames < 1:
            raise ValueError(f"min_video_frames must be >= 1, got {self.min_video_frames}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if not self.probe_wait_s >= 0:
            raise ValueError(f"probe_wait_s must be >= 0 seconds, got {self.probe_wait_s}")


class LongVideoDataset(torch.utils.data.Dataset):
    """Samples for one mode; see the module docstring for the sample dict and error handling."""

    def __init__(self, records: list, *, tokenizer: Tokenizer, num_video_tokens: NumVideoTokens,
                 config: VideoDatasetConfig, skip_report: SkipReport | None = None,
                 num_audio_tokens: NumVideoTokens | None = None):
        self.skip_report = skip_report if skip_report is not None else SkipReport()
        if not records:
            if self.skip_report.total:
                raise ValueError(f"no usable record to train on: all {self.skip_report.total} were skipped; "
                                 f"the top reasons:\n{self.skip_report.top_reasons()}")
            raise ValueError("records is empty: no usable record to train on")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.num_video_tokens = num_video_tokens
        self.num_audio_tokens = num_audio_tokens
        """``real mel frames -> placeholder tokens`` of an audio (records with ``audios``)."""
        self.config = config
        self.shard: FrameShard | None = None
        """With ``decode="lazy"``: this rank's slice of each video, decoded in ``__getitem__`` (in the
        loader's worker). A failure there is not this rank's alone to act on (the other ranks of the
        group decoded other frames): the sample carries it in ``shard_error`` and the consumer agrees
        with the group (:func:`~megatron_longvideo.data.frames.agree_on_shard_errors`)."""

    @classmethod
    def from_file(cls, path: str, *, tokenizer: Tokenizer, num_video_tokens: NumVideoTokens,
                  config: VideoDatasetConfig, skip_report: SkipReport | None = None,
                  num_audio_tokens: NumVideoTokens | None = None) -> LongVideoDataset:
        """Read and validate ``path`` (bad records raise, or are counted in ``skip_report``, a new
        ``SkipReport`` unless given, per ``config.on_error``)."""
        report = skip_report if skip_report is not None else SkipReport()
        record_set = load_records(path, kind="caption" if config.mode == "pretrain" else "qa",
                                  on_error=config.on_error, video_root=config.video_root,
                                  require_reasoning=config.mode == "sft", skip_report=report)
        if not record_set.records:
            if not record_set.errors:
                raise ValueError(f"{path}: the file holds no records")
            raise ValueError(f"{path}: no usable record: all {len(record_set.errors)} records were skipped "
                             f"(on_error='skip'); the top reasons:\n{report.top_reasons()}")
        return cls(record_set.records, tokenizer=tokenizer, num_video_tokens=num_video_tokens,
                   config=config, skip_report=report, num_audio_tokens=num_audio_tokens)

    def __len__(self) -> int:
        return len(self.records)

    def set_shard(self, shard: FrameShard | None) -> None:
        """Decode this rank's slice of each video in ``__getitem__`` (see ``shard``); needs ``decode="lazy"``."""
        if shard is not None and self.config.decode != "lazy":
            raise ValueError("shard: frame-sharded decoding needs a dataset with decode='lazy'")
        self.shard = shard

    def load_frames(self, video: str, *, decode: str | None = None) -> tuple[torch.Tensor, list[int], list[float]]:
        """``([T, 3, S, S] float32 normalised, indices, timestamps)`` of a video, via the cache if set; the
        frames a ``LazyFrames`` under ``decode="lazy"`` (``decode`` overrides the config's)."""
        cfg = self.config
        decode = decode or cfg.decode
        path = os.path.join(cfg.video_root, video)
        if cfg.cache_dir is None and decode == "full":
            out = decode_video(path, cfg.sampling, backend=cfg.backend)
            return out.frames, out.indices, out.timestamps
        entry = None
        if cfg.cache_dir is not None:
            key = cache.cache_key(path, cfg.sampling, cfg.backend)
            entry = cache.load_cached(cfg.cache_dir, key)
        if entry is None and decode == "lazy":
            frames = probe_shared(path, cfg.sampling, backend=cfg.backend, probe_dir=cfg.probe_dir or cfg.cache_dir,
                                  shard=self.shard, wait_s=cfg.probe_wait_s)
            return frames, list(frames.indices), frames.timestamps
        if entry is None:
            try:
                frames, indices, info = decode_resized_uint8(path, cfg.sampling, backend=cfg.backend)
            except VideoDecodeError as e:
                cache.save_bad(cfg.cache_dir, key, e)
                raise
            entry = {"frames": frames, "indices": indices, "timestamps": frame_timestamps(indices, info.fps)}
            cache.save_cached(cfg.cache_dir, key, entry)
        return normalize_frames(entry["frames"].float(), cfg.sampling), list(entry["indices"]), list(entry["timestamps"])

    def load_visual(self, kind: str, path: str, *, decode: str | None = None):
        """``(frames, indices, timestamps)`` of one media input of a record: a video (:meth:`load_frames`),
        an image, a one-frame video ``[1, 3, S, S]`` (``kind="image"``, never lazy: one frame), or an audio
        (``kind="audio"``): its log-mel windows packed for the audio tower ``[w, n_mels + 1, F]``
        (:func:`~megatron_longvideo.data.audio.pack_windows`), indices the windows, timestamps their starts."""
        full = os.path.join(self.config.video_root, path)
        if kind == "image":
            out = decode_image(full, self.config.sampling)
            return out.frames, out.indices, out.timestamps
        if kind == "audio":
            from megatron_longvideo.data.audio import decode_audio, log_mel_features, pack_windows

            audio = self.config.audio
            features, lengths = log_mel_features(decode_audio(full, audio).waveform, audio)
            windows = pack_windows(features, lengths)  # [w, n_mels + 1, F]
            num = windows.shape[0]
            return windows, list(range(num)), [float(k * audio.window_seconds) for k in range(num)]
        return self.load_frames(path, decode=decode)

    def num_tokens(self, kind: str, frames: torch.Tensor) -> int:
        """Placeholder tokens of one media input (``frames`` as :meth:`load_visual` returns them)."""
        if kind != "audio":
            return resolve_num_video_tokens(self.num_video_tokens, frames.shape[0])
        if self.num_audio_tokens is None:
            raise ValueError("num_audio_tokens: the dataset holds audio records; pass the model's counter "
                             "(models.audio_token_counter(cfg)) to LongVideoDataset")
        from megatron_longvideo.data.audio import unpack_windows

        real = int(unpack_windows(frames)[1].sum())  # real mel frames of the packed windows
        return resolve_num_video_tokens(self.num_audio_tokens, real)

    def _sample(self, index: int) -> dict:
        record = self.records[index]
        ident = getattr(record, "problem_id", None) or record.id
        context = f"record {ident!r} at {record.source}"
        videos, indices, timestamps, counts, shard_error = [], [], [], [], None
        for kind, path in record.visuals:
            try:
                frames, idx, times = self.load_visual(kind, path)  # frames: [T, 3, S, S]
                if kind == "video" and frames.shape[0] < self.config.min_video_frames:
                    raise VideoDecodeError(os.path.join(self.config.video_root, path),
                                           f"too few frames: {frames.shape[0]} sampled, "
                                           f"min_video_frames={self.config.min_video_frames}")
            except VideoDecodeError as e:
                raise type(e)(e.path, e.reason, context=context) from None  # an AudioDecodeError stays one
            if is_lazy(frames):
                frames.context = context
                if self.shard is not None:
                    try:
                        frames.decode_shard(self.shard)
                    except VideoDecodeError as e:
                        shard_error = shard_error or (e.path, str(e))
            videos.append(frames)
            indices.append(torch.tensor(idx, dtype=torch.long, device="cpu"))  # [T]
            timestamps.append(torch.tensor(times, dtype=torch.float64, device="cpu"))  # [T]
            try:
                counts.append(self.num_tokens(kind, frames))
            except ValueError as e:  # e.g. a media kind the model has no tower for: name the record
                raise ValueError(f"{context}: {kind} {path!r}: {e}") from None
        builder = {"pretrain": build_caption_example, "sft": build_sft_example, "rl": build_rl_prompt}
        example = builder[self.config.mode](record, self.tokenizer, counts, self.config.prompt)
        return {
            "index": index,
            "sample_id": ident,
            "videos": videos,  # per visual input [T_i, 3, S, S] (images: T_i = 1); empty: text-only
            "video_paths": [os.path.join(self.config.video_root, path) for _, path in record.visuals],
            "visual_kinds": [kind for kind, _ in record.visuals],
            "frame_indices": indices,
            "timestamps": timestamps,
            "input_ids": example.input_ids,  # [S]
            "labels": example.labels,  # [S] or None
            "video_start": example.video_start,
            "visual_spans": example.visual_spans,
            "num_video_tokens": example.num_video_tokens,
            "num_prompt_tokens": example.num_prompt_tokens,
            "ground_truth": example.ground_truth,
            "bad_inputs": [],
            "shard_error": shard_error,
        }

    def __getitem__(self, index: int) -> dict:
        bad: list[tuple[str, str]] = []
        for attempt in range(self.config.max_consecutive_skips + 1):
            i = (index + attempt) % len(self.records)
            try:
                sample = self._sample(i)
            except VideoDecodeError as e:
                if self.config.on_error == "raise":
                    raise
                bad.append((e.path, str(e)))
                continue
            sample["requested_index"] = index
            sample["bad_inputs"] = bad
            return sample
        by_reason = collections.Counter(video_skip_reason(message) for _, message in bad)
        reasons = ", ".join(f"{n} x {r}" for r, n in by_reason.most_common())
        first = next((path for _, path in self.records[index].visuals), self.records[index].source)
        raise VideoDecodeError(
            first,
            f"{len(bad)} consecutive bad videos from item {index} (max_consecutive_skips="
            f"{self.config.max_consecutive_skips}); the data looks broken ({reasons}). Last: {bad[-1][1]}",
        )
