"""LongVideo-Reason records: read, validate and normalise question and caption records.

A dataset file is JSONL (one object per line) or one JSON list of objects. A question record:

    {"problem_id": "v1-q0", "data_type": "video", "videos": "cooking/v1.mp4",
     "problem": "What is added first?\\nA. salt\\nB. oil", "problem_type": "multiple choice",
     "reasoning": "The cook pours oil ...", "answer": "B"}

Only ``videos``, ``problem`` and ``answer`` are required, so the public LongVideo-Reason files
(``problem``, ``reasoning``, ``videos``, ``answer``) load as released:

- ``videos`` is a path relative to the video root (an absolute path is kept as is), or a list of them:
  several videos in one prompt. ``images`` (or ``image``) likewise: image files, each a one-frame
  visual input (PyAV reads PNG, JPEG and the other image formats FFmpeg knows). The prompt shows the
  images first, then the videos, each with its own placeholder, before the question.
- ``audios`` (or ``audio``): audio files, or videos whose audio track is meant, for a model with an
  audio encoder (the Qwen2-Audio family); shown after the videos, each with its own placeholder.
- ``data_type`` is ``video`` (default when ``videos`` is given), ``image`` (default when only
  ``images`` is), ``audio`` (default when only ``audios`` is) or ``text``: a text-only question (math,
  reasoning) with none of these fields, trained in the same dataset and steps as the others. A record
  with no media field and no ``data_type: text`` is an error (``videos: missing``), so a lost field is
  never read as a text-only question.
- ``problem_id`` (string or integer), if absent, is derived from the visual inputs and the problem text:
  ``<first file's stem>-<first 10 hex digits of sha1(files + "\\n" + problem)>`` (``files``: the one video's
  path, or the paths joined by newlines; ``text`` for a text-only record), so it stays the same
  when the file is reordered, split or re-read; a repeated (video, problem) pair gets ``-2``, ``-3``...
- ``problem_type`` is ``multiple choice``, ``numerical`` or ``free-form``. If absent (or ``general``,
  as some generators write) it is inferred: options present -> multiple choice; an answer that parses
  as a number -> numerical; else free-form.
- Multiple-choice options are inline in ``problem`` (lines or runs like ``A. salt B. oil``) or a list
  field ``options`` (``["A. salt", "B. oil"]`` or ``["salt", "oil"]``).
- ``answer`` (or ``solution`` when ``answer`` is absent) may be wrapped as ``<answer>B</answer>``; a
  multiple-choice answer may be ``B``, ``(b)``, ``B. oil`` or ``oil`` and is normalised to the letter.

A caption record (projector pretraining) has ``videos`` and ``caption`` and an optional ``id``.

Every problem is reported as ``RecordError`` naming file, line and field. With ``on_error="skip"``
bad records are dropped and returned alongside the good ones (and counted in a ``SkipReport`` if one
is passed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re

from megatron_longvideo.data.errors import OnError, RecordError, SkipReport, check_on_error

PROBLEM_TYPES = ("multiple choice", "numerical", "free-form")
_TYPE_ALIASES = {"multiple_choice": "multiple choice", "multiple-choice": "multiple choice", "mc": "multiple choice",
                 "free_form": "free-form", "free form": "free-form", "open-ended": "free-form",
                 "numeric": "numerical", "number": "numerical"}
_INFERRED_TYPES = (None, "general")
"""``problem_type`` values that mean "infer it" (absent, or the placeholder some generators write)."""
_WRAPPED_ANSWER = re.compile(r"\s*<answer>(.*?)</answer>\s*", re.S)
_INLINE_OPTION = re.compile(r"(?:^|\s|\()([A-J])[.):]\s+")
_LABELLED = re.compile(r"^\(?([A-J])[.):]\s*(.*)$", re.S)


DATA_TYPES = ("video", "image", "audio", "text")


@dataclasses.dataclass(frozen=True)
class VideoQARecord:
    """A validated question about its visual inputs (none for a text-only question)."""

    problem_id: str
    videos: tuple[str, ...]
    """Video paths relative to the video root, in prompt order (empty: no video)."""
    problem: str
    """The question as given (with inline options if it had them)."""
    problem_type: str
    options: tuple[tuple[str, str], ...]
    """(letter, text) pairs for multiple choice; empty otherwise."""
    options_inline: bool
    """True if the options were written in ``problem`` (so prompts need not repeat them)."""
    reasoning: str | None
    answer: str
    """Normalised: the option letter for multiple choice, the number's text for numerical."""
    source: str
    """``file:line`` the record came from, for messages."""
    images: tuple[str, ...] = ()
    """Image paths relative to the video root (each a one-frame visual input), shown before the videos."""
    audios: tuple[str, ...] = ()
    """Audio paths relative to the video root (an audio file, or a video's audio track), after the videos."""

    @property
    def visuals(self) -> tuple[tuple[str, str], ...]:
        """``(kind, path)`` of every media input in prompt order: the images, the videos, then the audios."""
        return (tuple(("image", p) for p in self.images) + tuple(("video", p) for p in self.videos)
                + tuple(("audio", p) for p in self.audios))

    @property
    def video(self) -> str | None:
        """The first video (None for a record without one)."""
        return self.videos[0] if self.videos else None

    @property
    def question_text(self) -> str:
        """The question with its options, each on its own line, as the prompt shows it."""
        if self.options and not self.options_inline:
            return self.problem.rstrip() + "\n" + "\n".join(f"{k}. {v}" for k, v in self.options)
        return self.problem


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
    """A video and its caption, for projector pretraining."""

    id: str
    video: str
    caption: str
    source: str

    @property
    def videos(self) -> tuple[str, ...]:
        return (self.video,)

    @property
    def images(self) -> tuple[str, ...]:
        return ()

    @property
    def audios(self) -> tuple[str, ...]:
        return ()

    @property
    def visuals(self) -> tuple[tuple[str, str], ...]:
        return (("video", self.video),)


@dataclasses.dataclass(frozen=True)
class RecordSet:
    """The good records of a file and the errors of the bad ones (empty unless skip mode)."""

    records: list
    errors: list[RecordError]


def iter_json_objects(path: str):
    """Yield ``(line, obj_or_exception)`` for each record of a JSONL or JSON-list file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        decoder = json.JSONDecoder()
        pos = len(text) - len(stripped) + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                yield line, RecordError(path, line, None, f"invalid JSON ({e.msg}); the rest of the list is unreadable")
                return
            yield line, obj
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as e:
            yield line, RecordError(path, line, None, f"invalid JSON ({e.msg} at column {e.colno})")


def _string(obj: dict, key: str, err, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise err(key, "missing")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise err(key, f"expected a non-empty string, got {value!r}")
    return value


def _paths(obj: dict, keys: tuple[str, str], err, video_root: str | None) -> tuple[str, ...] | None:
    """The paths of field ``keys[0]`` (or its singular ``keys[1]``): a string or a list of strings; None
    when the record has neither."""
    field = keys[0] if obj.get(keys[0]) is not None else keys[1]
    value = obj.get(field)
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise err(field, "expected a path string or a non-empty list of them, got []")
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise err(field, f"expected a path string, got {item!r}")
        if video_root is not None and not os.path.isfile(os.path.join(video_root, item)):
            kind = keys[1]
            raise err(field, f"{kind} file not found: {os.path.join(video_root, item)}")
    return tuple(items)


def _video(obj: dict, err, video_root: str | None) -> str:
    """The one video of a caption record."""
    videos = _paths(obj, ("videos", "video"), err, video_root)
    if videos is None:
        raise err("videos", "missing")
    if len(videos) != 1:
        raise err("videos", f"a caption describes one video, got a list of {len(videos)}")
    return videos[0]


def _visuals(obj: dict, err, video_root: str | None) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``(videos, images, audios)`` of a question record, checked against its ``data_type``."""
    videos = _paths(obj, ("videos", "video"), err, video_root)
    images = _paths(obj, ("images", "image"), err, video_root)
    audios = _paths(obj, ("audios", "audio"), err, video_root)
    data_type = obj.get("data_type")
    if data_type is None:  # inferred from the fields given; none at all reads as a video record (videos: missing)
        data_type = "image" if videos is None and images is not None else "audio" if videos is None and audios is not None else "video"
    if data_type not in DATA_TYPES:
        raise err("data_type", f"expected one of {', '.join(DATA_TYPES)}, got {data_type!r}")
    if data_type == "text" and (videos or images or audios):
        raise err("data_type", "'text' records have no videos, images or audios; drop them or set data_type")
    if data_type == "video" and videos is None:
        raise err("videos", "missing (a question without visual input needs data_type 'text')")
    if data_type == "image" and images is None:
        raise err("images", "missing (data_type 'image')")
    if data_type == "audio" and audios is None:
        raise err("audios", "missing (data_type 'audio')")
    return videos or (), images or (), audios or ()


def parse_inline_options(problem: str) -> tuple[tuple[str, str], ...]:
    """Options written in the question as ``A. x`` / ``(B) y`` / ``C: z``: consecutive letters from A."""
    matches = list(_INLINE_OPTION.finditer(problem))
    options, expected = [], "A"
    for i, m in enumerate(matches):
        if m.group(1) != expected:
            if options:
                break
            continue
        end = matches[i + 1].start() if i + 1 < len(matches) else len(problem)
        options.append((m.group(1), problem[m.end() : end].strip()))
        expected = chr(ord(expected) + 1)
    return tuple(options) if len(options) >= 2 else ()


def _options_field(value, err) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) and v.strip() for v in value):
        raise err("options", f"expected a list of at least 2 non-empty strings, got {value!r}")
    labelled = [_LABELLED.match(v.strip()) for v in value]
    letters = [chr(ord("A") + i) for i in range(len(value))]
    if all(labelled) and [m.group(1) for m in labelled] == letters:
        return tuple((m.group(1), m.group(2).strip()) for m in labelled)
    return tuple(zip(letters, (v.strip() for v in value)))


def derive_problem_id(files, problem: str) -> str:
    """The id of a record without ``problem_id``: ``<first file's stem>-<sha1(files + newline + problem)[:10]>``;
    ``files`` one path, or a sequence of them (joined by newlines; none: ``text``)."""
    files = [files] if isinstance(files, str) else list(files)
    joined = "\n".join(files) if files else "text"
    stem = os.path.splitext(os.path.basename(files[0]))[0] if files else "text"
    digest = hashlib.sha1((joined + "\n" + problem).encode("utf-8")).hexdigest()
    return f"{stem or 'video'}-{digest[:10]}"


def infer_problem_type(problem: str, answer: str, *, has_options_field: bool = False) -> str:
    """``multiple choice`` if options are given (field or inline), ``numerical`` if ``answer`` is a
    finite number, else ``free-form``."""
    if has_options_field or parse_inline_options(problem):
        return "multiple choice"
    try:
        return "numerical" if math.isfinite(float(answer.strip().replace(",", ""))) else "free-form"
    except ValueError:
        return "free-form"


def normalize_choice(answer: str, options: tuple[tuple[str, str], ...]) -> str | None:
    """The option letter ``answer`` names (``B``, ``(b)``, ``B. oil`` or ``oil``), or None."""
    text = re.sub(r"</?answer>", "", answer).strip()
    by_letter = dict(options)
    m = re.fullmatch(r"\(?([A-Ja-j])\)?[.):]?(?:\s+(.*))?", text, re.S)
    if m and m.group(1).upper() in by_letter:
        letter = m.group(1).upper()
        if not m.group(2) or m.group(2).strip().lower() == by_letter[letter].lower():
            return letter
    for letter, option in options:
        if text.lower() == option.lower():
            return letter
    return None


def parse_qa_record(obj, *, path: str, line: int, video_root: str | None = None,
                    require_reasoning: bool = False) -> VideoQARecord:
    """Validate one question record (see module docstring); raise ``RecordError`` if it is bad."""

    def err(field, reason):
        return RecordError(path, line, field, reason)

    if not isinstance(obj, dict):
        raise err(None, f"expected a JSON object, got {type(obj).__name__}")
    videos, images, audios = _visuals(obj, err, video_root)
    problem = _string(obj, "problem", err)
    problem_id = _string(obj, "problem_id", err, required=False) or derive_problem_id(images + videos + audios, problem)
    reasoning = _string(obj, "reasoning", err, required=require_reasoning)
    answer_key = "solution" if obj.get("answer") is None and obj.get("solution") is not None else "answer"
    answer = _string(obj, answer_key, err)
    wrapped = _WRAPPED_ANSWER.fullmatch(answer)
    if wrapped:
        answer = wrapped.group(1).strip()
        if not answer:
            raise err(answer_key, "empty answer inside <answer></answer>")
    raw_type = obj.get("problem_type")
    inferred = raw_type is None or (isinstance(raw_type, str) and raw_type.strip().lower() in _INFERRED_TYPES)
    if inferred:
        problem_type = infer_problem_type(problem, answer, has_options_field=obj.get("options") is not None)
    else:
        raw_type = _string(obj, "problem_type", err).strip().lower()
        problem_type = _TYPE_ALIASES.get(raw_type, raw_type)
        if problem_type not in PROBLEM_TYPES:
            raise err("problem_type", f"expected one of {', '.join(PROBLEM_TYPES)}, got {raw_type!r}")
    options, inline = (), False
    if problem_type == "multiple choice":
        if obj.get("options") is not None:
            options = _options_field(obj["options"], err)
        else:
            options, inline = parse_inline_options(problem), True
            if not options:
                raise err("problem", "multiple-choice question without options: expected an 'options' list "
                                     "or options inline in the problem ('A. ...', 'B. ...')")
        letter = normalize_choice(answer, options)
        if letter is None:
            letters = ", ".join(k for k, _ in options)
            hint = (" (problem_type inferred as multiple choice from the options; set problem_type to override)"
                    if inferred else "")
            raise err("answer", f"{answer!r} is not among the options {letters}{hint}")
        answer = letter
    elif problem_type == "numerical":
        try:
            value = float(answer.strip().replace(",", ""))
        except ValueError:
            raise err("answer", f"numerical answer expected, got {answer!r}") from None
        if not math.isfinite(value):
            raise err("answer", f"numerical answer must be finite, got {answer!r}")
        answer = answer.strip()
    return VideoQARecord(problem_id=problem_id, videos=videos, images=images, audios=audios, problem=problem,
                         problem_type=problem_type, options=options, options_inline=inline, reasoning=reasoning,
                         answer=answer, source=f"{path}:{line}")


def parse_caption_record(obj, *, path: str, line: int, video_root: str | None = None) -> CaptionRecord:
    """Validate one caption record; raise ``RecordError`` if it is bad."""

    def err(field, reason):
        return RecordError(path, line, field, reason)

    if not isinstance(obj, dict):
        raise err(None, f"expected a JSON object, got {type(obj).__name__}")
    video = _video(obj, err, video_root)
    caption = _string(obj, "caption", err)
    rid = _string(obj, "id", err, required=False) or f"{os.path.basename(path)}:{line}"
    return CaptionRecord(id=rid, video=video, caption=caption, source=f"{path}:{line}")


def load_records(path: str, *, kind: str = "qa", on_error: OnError = "raise", video_root: str | None = None,
                 require_reasoning: bool = False, skip_report: SkipReport | None = None) -> RecordSet:
    """Read and validate every record of ``path``.

    ``kind`` is ``qa`` or ``caption``. ``on_error="raise"`` stops at the first bad record;
    ``"skip"`` keeps going and returns the errors, each also counted in ``skip_report`` if given.
    With ``video_root`` each record's video file must exist. ``require_reasoning`` (CoT-SFT) makes
    ``reasoning`` mandatory.
    """
    check_on_error(on_error)
    if kind not in ("qa", "caption"):
        raise ValueError(f"kind must be 'qa' or 'caption', got {kind!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: dataset file not found")
    records, errors = [], []
    seen_ids: dict[str, int] = {}
    for line, obj in iter_json_objects(path):
        try:
            if isinstance(obj, RecordError):
                raise obj
            if kind == "qa":
                rec = parse_qa_record(obj, path=path, line=line, video_root=video_root,
                                      require_reasoning=require_reasoning)
                if obj.get("problem_id") is None and rec.problem_id in seen_ids:  # same video and problem
                    k = 2
                    while f"{rec.problem_id}-{k}" in seen_ids:
                        k += 1
                    rec = dataclasses.replace(rec, problem_id=f"{rec.problem_id}-{k}")
                if rec.problem_id in seen_ids:
                    raise RecordError(path, line, "problem_id",
                                      f"duplicate {rec.problem_id!r} (first at line {seen_ids[rec.problem_id]})")
                seen_ids[rec.problem_id] = line
            else:
                rec = parse_caption_record(obj, path=path, line=line, video_root=video_root)
        except RecordError as e:
            if on_error == "raise":
                raise
            errors.append(e)
            if skip_report is not None:
                skip_report.add_record_errors([e])
            continue
        records.append(rec)
    return RecordSet(records=records, errors=errors)
