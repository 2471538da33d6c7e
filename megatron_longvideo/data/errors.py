"""Errors for bad input, and the tally a run keeps when it is told to skip bad input.

Every bad record or bad video produces exactly one message that names the file (and, for records,
the line and field) and says what was expected. Both exception classes derive from ``ValueError`` so
callers that only care about "bad input" can catch that.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

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


@dataclasses.dataclass
class SkipReport:
    """Bad inputs met by a run in skip mode: counts and the first few messages.

    Lives in the process that drives the run; DataLoader workers send ``(path, message)`` pairs with
    each batch (``bad_inputs``) and the driver adds them here. A bad video is counted once however
    many times it is met (epochs, DP ranks).
    """

    num_bad_records: int = 0
    bad_videos: dict[str, str] = dataclasses.field(default_factory=dict)
    messages: list[str] = dataclasses.field(default_factory=list)
    max_messages: int = 20

    def add_record_errors(self, errors) -> None:
        self.num_bad_records += len(errors)
        self._keep(str(e) for e in errors)

    def add_video_errors(self, errors) -> None:
        """``errors``: ``VideoDecodeError`` objects or ``(path, message)`` pairs."""
        for e in errors:
            path, message = (e.path, str(e)) if isinstance(e, VideoDecodeError) else e
            if path not in self.bad_videos:
                self.bad_videos[path] = message
                self._keep([message])

    def _keep(self, messages) -> None:
        for m in messages:
            if len(self.messages) < self.max_messages:
                self.messages.append(m)

    @property
    def num_bad_videos(self) -> int:
        return len(self.bad_videos)

    @property
    def total(self) -> int:
        return self.num_bad_records + self.num_bad_videos

    def summary(self) -> str:
        """One line for the end of a run, then the kept messages, one per line."""
        head = (f"skipped {self.total} bad inputs: {self.num_bad_records} records, "
                f"{self.num_bad_videos} videos")
        return "\n".join([head, *("  " + m for m in self.messages)])
