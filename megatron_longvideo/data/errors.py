"""Errors for bad input, and the tally a run keeps when it is told to skip bad input.

Every bad record or bad video produces exactly one message that names the file (and, for records,
the line and field) and says what was expected. Both exception classes derive from ``ValueError`` so
callers that only care about "bad input" can catch that.

In skip mode a ``SkipReport`` counts what was dropped under a short reason (``record: missing field
problem``, ``video: truncated or corrupt``, ...), logs it rate-limited, and summarises it at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from typing import Callable, Literal

OnError = Literal["raise", "skip"]
"""What a run does with a bad record or video: ``raise`` on the first one, or ``skip`` it and count."""


class RecordError(ValueError):
    """A record of a JSONL / JSON dataset file is malformed.

    The message names the file, the 1-based line and the field. Constructed with one argument it
    takes that as the whole message (how DataLoader workers and pickling rebuild exceptions).
    """

    def __init__(self, path: str, line: int | None = None, field: str | None = None, reason: str | None = None):
        self.path, self.line, self.field, self.reason = str(path), line, field, reason
        if line is None and reason is None:
            super().__init__(self.path)
            return
        what = f"field '{field}': " if field else ""
        super().__init__(f"{self.path}:{line}: bad record: {what}{reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.field, self.reason))


class VideoDecodeError(ValueError):
    """A video file cannot be used: missing, empty, truncated, not a video, unsupported, too large.

    Constructed with one argument it takes that as the whole message (see ``RecordError``).
    """

    def __init__(self, path: str, reason: str | None = None, *, context: str | None = None):
        self.path, self.reason, self.context = str(path), reason, context
        if reason is None:
            super().__init__(self.path)
            return
        suffix = f" ({context})" if context else ""
        super().__init__(f"{self.path}: cannot decode video: {reason}{suffix}")

    def __reduce__(self):
        return (_rebuild_video_error, (self.path, self.reason, self.context))


def _rebuild_video_error(path, reason, context):
    return VideoDecodeError(path, reason, context=context)


def check_on_error(on_error: str, *, field: str = "on_error") -> None:
    """Raise ``ValueError`` naming ``field`` unless ``on_error`` is ``raise`` or ``skip``."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"{field} must be 'raise' or 'skip', got {on_error!r}")


_VIDEO_REASONS = (  # (start of VideoDecodeError.reason, short reason); first match wins
    ("file not found", "file not found"),
    ("is a directory", "not a file"),
    ("file is empty", "empty file"),
    ("not a readable video container", "not a readable container"),
    ("no video stream", "no video stream"),
    ("unsupported codec", "unsupported codec"),
    ("frame size", "frame too large"),
    ("too few frames", "too few frames"),
    ("truncated or corrupt", "truncated or corrupt"),
    ("corrupt", "truncated or corrupt"),
    ("video stream has no", "stream without frames"),
)
_DECODE_MARK = ": cannot decode video: "
_AUDIO_REASONS = (  # an audio track's own reasons (``data.audio.AudioDecodeError``), before the shared ones
    ("not a readable media container", "not a readable container"),
    ("no audio stream", "no audio stream"),
    ("audio stream has no samples", "empty audio"),
)
_AUDIO_MARK = ": cannot decode audio: "


def record_skip_reason(error: RecordError) -> str:
    """The short reason a bad record is counted under, e.g. ``record: missing field problem``."""
    field, reason = error.field, error.reason or ""
    if field is None:
        if reason.startswith("invalid JSON"):
            return "record: invalid JSON"
        return "record: not a JSON object" if reason.startswith("expected a JSON object") else "record: malformed"
    if reason == "missing":
        return f"record: missing field {field}"
    if field == "videos" and reason.startswith("video file not found"):
        return "record: video file not found"
    if field == "answer" and "not among the options" in reason:
        return "record: answer not an option"
    if field == "problem_id" and reason.startswith("duplicate"):
        return "record: duplicate problem_id"
    if field == "problem" and "without options" in reason:
        return "record: multiple choice without options"
    return f"record: bad field {field}"


def video_skip_reason(message: str) -> str:
    """The short reason a bad video is counted under, from its ``VideoDecodeError`` message or reason;
    a bad audio track's message (``<path>: cannot decode audio: ...``) gives ``audio: <short reason>``."""
    if _AUDIO_MARK in message:
        reason = message.split(_AUDIO_MARK, 1)[1]
        for start, short in _AUDIO_REASONS + _VIDEO_REASONS:
            if reason.startswith(start):
                return f"audio: {short}"
        return "audio: cannot decode"
    reason = message.split(_DECODE_MARK, 1)[1] if _DECODE_MARK in message else message
    for start, short in _VIDEO_REASONS:
        if reason.startswith(start):
            return f"video: {short}"
    return "video: cannot decode"


def _log_warning(message: str) -> None:
    logging.getLogger("megatron_longvideo.data").warning(message)


@dataclasses.dataclass
class SkipReport:
    """Bad inputs met by a run in skip mode, counted by reason (``record: ...``, ``video: ...``).

    Lives in the process that drives the run; DataLoader workers send ``(path, message)`` pairs with
    each batch (``bad_inputs``) and the driver adds them here. A bad video is counted once however
    many times it is met (epochs, DP ranks). Each skip is logged through ``log`` (rate-limited: the
    first ``log_first`` of each reason, then every ``log_every``-th), so a run that drops thousands of
    inputs says so without flooding its log.
    """

    log: Callable[[str], None] | None = _log_warning
    """Where a skip's line goes (``None``: nowhere); a ``logging`` warning by default."""
    log_first: int = 5
    """Lines logged for the first skips of each reason."""
    log_every: int = 100
    """After ``log_first``, one line for every this many skips of a reason."""
    max_messages: int = 20
    """Messages kept in ``messages`` (the first ones met, all reasons together)."""
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    """Count of skips by reason."""
    examples: dict[str, str] = dataclasses.field(default_factory=dict)
    """The first message of each reason."""
    bad_videos: dict[str, str] = dataclasses.field(default_factory=dict)
    """Path -> message of every bad video."""
    messages: list[str] = dataclasses.field(default_factory=list)
    """The first ``max_messages`` skip messages, in the order met."""

    def __post_init__(self):
        if self.log_first < 0 or self.log_every < 1:
            raise ValueError(f"log_first must be >= 0 and log_every >= 1, got {self.log_first}, {self.log_every}")

    def count(self, reason: str, message: str) -> None:
        """Count one skipped input under ``reason`` (its ``message`` names the file and what is wrong)."""
        self.reasons[reason] += 1
        self.examples.setdefault(reason, message)
        if len(self.messages) < self.max_messages:
            self.messages.append(message)
        n = self.reasons[reason]
        if self.log is not None and (n <= self.log_first or n % self.log_every == 0):
            tail = f" (from now on one line in every {self.log_every})" if n == self.log_first else ""
            self.log(f"skipped input #{n} for reason '{reason}'{tail}: {message}")

    def add_record_errors(self, errors) -> None:
        """``errors``: ``RecordError`` objects of records dropped when their file was read."""
        for e in errors:
            self.count(record_skip_reason(e), str(e))

    def add_video_errors(self, errors) -> None:
        """``errors``: ``VideoDecodeError`` objects or ``(path, message)`` pairs."""
        for e in errors:
            path, message = (e.path, str(e)) if isinstance(e, VideoDecodeError) else e
            if path not in self.bad_videos:
                self.bad_videos[path] = message
                self.count(video_skip_reason(message), message)

    def merge_bad_videos(self, bad_videos: dict[str, str]) -> None:
        """Count another rank's bad videos (its ``bad_videos``, e.g. gathered with
        ``all_gather_object``) without logging them again; videos already counted here are not."""
        log, self.log = self.log, None
        try:
            self.add_video_errors(bad_videos.items())
        finally:
            self.log = log

    def counts(self) -> dict[str, int]:
        """Skips by reason, most frequent first."""
        return dict(self.reasons.most_common())

    @property
    def num_bad_records(self) -> int:
        return sum(n for r, n in self.reasons.items() if r.startswith("record:"))

    @property
    def num_bad_videos(self) -> int:
        return sum(n for r, n in self.reasons.items() if r.startswith("video:"))

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def top_reasons(self, top: int = 3) -> str:
        """The ``top`` most frequent reasons, one line each with its count and first message."""
        lines = [f"  {n} x {r}, e.g. {self.examples[r]}" for r, n in self.reasons.most_common(top)]
        if len(self.reasons) > top:
            lines.append(f"  ... and {len(self.reasons) - top} more reasons")
        return "\n".join(lines)

    def summary(self, top: int = 5) -> str:
        """A short paragraph for the end of a run: totals, then the top reasons with an example each."""
        head = (f"skipped {self.total} bad inputs: {self.num_bad_records} records, "
                f"{self.num_bad_videos} videos")
        return head + ("\n" + self.top_reasons(top) if self.reasons else "")

    def as_scalars(self, prefix: str = "data/skipped/") -> dict[str, float]:
        """TensorBoard scalars: ``total``, ``records``, ``videos`` and one per reason
        (``record: missing field problem`` -> ``record/missing_field_problem``), as running totals."""
        out = {f"{prefix}total": float(self.total), f"{prefix}records": float(self.num_bad_records),
               f"{prefix}videos": float(self.num_bad_videos)}
        for reason, n in self.reasons.items():
            parts = [re.sub(r"[^a-z0-9]+", "_", p.lower()).strip("_") for p in reason.split(": ", 1)]
            out[prefix + "/".join(parts)] = float(n)
        return out


def report_run_skips(report: SkipReport, log: Callable[[str], None] = print) -> None:
    """At the end of a run: every rank's bad videos gathered (a collective: every rank calls it), the
    records counted once (every rank read the same file), and the summary logged on rank 0."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        videos = [None] * dist.get_world_size()
        dist.all_gather_object(videos, report.bad_videos)
        for other in videos:
            report.merge_bad_videos(other)
    if report.total and (not dist.is_initialized() or dist.get_rank() == 0):
        log(report.summary())
