"""Question-reasoning-answer records from clip captions, written by a chat model.

Each caption record (``videos``, ``caption``, ``id``; the captions JSONL that ``synthetic`` writes)
becomes ``questions_per_clip`` multiple-choice records with a reasoning string, asked of any
OpenAI-compatible endpoint (``POST {base_url}/chat/completions``, standard library HTTP only). A reply
is a JSON object (bare, in a ```json fence or inside other text) with ``problem`` (the question and
its options ``A.``-``D.``), ``problem_type``, ``reasoning`` and ``answer`` (a letter); the builder adds
``problem_id`` (``{caption id}-q{k}``), ``videos`` and ``data_type`` and validates the result with
``parse_qa_record``, so every written record loads with ``load_records(kind="qa")``.

Failures never stop a run. HTTP 429 / 5xx, timeouts and connection errors are retried with
exponential backoff and jitter; a malformed or invalid reply is asked again at once; after
``max_retries`` re-asks (or at once for another HTTP error) the question is skipped and counted under
its reason. Output is appended and flushed record by record, so a killed run resumes: questions whose
``problem_id`` is already in the output are not asked again, and a half-written last line is cut off.

``tools/build_reasoning_dataset.py`` is the command-line front end.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request

from megatron_longvideo.data.errors import RecordError
from megatron_longvideo.data.records import CaptionRecord, load_records, parse_qa_record

SYSTEM_PROMPT = (
    "You write exam questions about videos. You cannot see the video; a caption tells you what it "
    "shows. Reply with one JSON object and nothing else."
)

QUESTION_PROMPT = """Caption of the video:
\"\"\"{caption}\"\"\"

Write one multiple-choice question about this video whose answer is stated or clearly implied by the caption.{variation}
Reply with a JSON object with exactly these keys:
  "problem": the question, then four options on their own lines, lettered "A. ", "B. ", "C. ", "D. ", exactly one of them correct;
  "problem_type": "multiple choice";
  "reasoning": a few sentences that reach the answer from what is seen in the video (write as someone watching it; do not mention a caption);
  "answer": the letter of the correct option."""

_VARIATION = "\nThis is question {number} of {total} about this video; ask about a different detail than these:\n{previous}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatEndpoint:
    """An OpenAI-compatible chat-completions endpoint and how to call it."""

    base_url: str
    """e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1`` (``/chat/completions`` is added)."""

    model: str
    """The ``model`` field of each request."""

    api_key: str | None = dataclasses.field(default=None, repr=False)
    """Sent as ``Authorization: Bearer KEY`` when set; never printed."""

    timeout_s: float = 60.0
    """Seconds to wait for the connection and for each read of the reply."""

    temperature: float = 0.7
    """Sampling temperature; above 0 a re-asked question can get a different reply."""

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model.strip():
            raise ValueError("model must be a non-empty string")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """How many questions to ask per caption and how hard to try."""

    questions_per_clip: int = 1
    """Records per caption: ``problem_id`` ``{id}-q0``, ``{id}-q1``, ...; later ones are told the earlier questions."""

    max_retries: int = 3
    """Re-asks per question after a retryable failure (429 / 5xx, timeout, connection, bad reply)."""

    backoff_s: float = 1.0
    """First wait before re-asking after a 429 / 5xx / timeout / connection error; doubles each time."""

    max_backoff_s: float = 30.0
    """Longest wait (also caps a server's ``Retry-After``)."""

    limit: int | None = None
    """Use only the first ``limit`` captions of the file."""

    workers: int = 1
    """Captions in flight at once (threads); the output order is the captions' order whatever the value."""

    seed: int = 0
    """Seed of the backoff jitter."""

    def __post_init__(self):
        for name, low in (("questions_per_clip", 1), ("max_retries", 0), ("workers", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        for name in ("backoff_s", "max_backoff_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")


@dataclasses.dataclass
class BuildSummary:
    """What a run did, per question: built now, found in the output already, or skipped (by reason)."""

    out_path: str
    num_captions: int = 0
    num_built: int = 0
    num_resumed: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    messages: list[str] = dataclasses.field(default_factory=list)
    max_messages: int = 10

    def skip(self, reason: str, message: str, count: int = 1) -> None:
        self.skipped[reason] += count
        if len(self.messages) < self.max_messages:
            self.messages.append(message)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line of counts, then the first few skip messages, one per line."""
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()))
        head = (f"{self.out_path}: built {self.num_built}, resumed {self.num_resumed}, "
                f"skipped {self.num_skipped}{f' ({reasons})' if reasons else ''} from {self.num_captions} captions")
        return "\n".join([head, *("  " + m for m in self.messages)])


class AttemptFailed(Exception):
    """One request that gave no record; ``reason`` is the key it is counted under if it was the last."""

    def __init__(self, reason: str, detail: str, *, retryable: bool = True, backoff: bool = True,
                 retry_after: float | None = None):
        super().__init__(detail)
        self.reason, self.retryable, self.backoff, self.retry_after = reason, retryable, backoff, retry_after


def _snippet(text, limit: int = 160) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _retry_after(value) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


def chat_completion(endpoint: ChatEndpoint, messages: list[dict]) -> str:
    """``choices[0].message.content`` of one request; raise ``AttemptFailed`` if there is none."""
    body = json.dumps({"model": endpoint.model, "messages": messages, "temperature": endpoint.temperature})
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    request = urllib.request.Request(endpoint.url, data=body.encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=endpoint.timeout_s) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        try:
            detail = _snippet(e.read())
        except (OSError, http.client.HTTPException):
            detail = "(no body)"
        retryable = e.code == 429 or e.code >= 500
        raise AttemptFailed(f"HTTP {e.code}", f"HTTP {e.code} from {endpoint.url}: {detail}", retryable=retryable,
                            retry_after=_retry_after(e.headers.get("Retry-After"))) from None
    except TimeoutError:
        raise AttemptFailed("timeout", f"no reply from {endpoint.url} within {endpoint.timeout_s:g} s") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise AttemptFailed("timeout", f"no connection to {endpoint.url} within {endpoint.timeout_s:g} s") from None
        raise AttemptFailed("connection error", f"{endpoint.url}: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # reset, remote closed, bad status line
        raise AttemptFailed("connection error", f"{endpoint.url}: {type(e).__name__}: {e}") from None
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise AttemptFailed("malformed reply", f"not a chat completion: {_snippet(raw)}", backoff=False) from None
    if not isinstance(content, str):
        raise AttemptFailed("malformed reply", f"message content is not text: {_snippet(content)}", backoff=False)
    return content


def extract_json_object(text: str) -> dict:
    """The first JSON object in ``text`` (bare, fenced in ```json or amid prose); ``AttemptFailed`` if none."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    raise AttemptFailed("malformed reply", f"no JSON object in the reply {_snippet(text)}", backoff=False)


def record_from_reply(reply: dict, caption: CaptionRecord, problem_id: str) -> dict:
    """The output record for a parsed reply, validated by ``parse_qa_record``; ``AttemptFailed`` if invalid."""
    record = {"problem_id": problem_id, "data_type": "video", "videos": caption.video}
    for key in ("problem", "problem_type", "reasoning", "answer", "options"):
        if reply.get(key) is not None:
            record[key] = reply[key]
    try:
        parsed = parse_qa_record(record, path="reply", line=0, require_reasoning=True)
    except RecordError as e:
        what = f"field '{e.field}': " if e.field else ""
        raise AttemptFailed("invalid record", f"{what}{e.reason}", backoff=False) from None
    if parsed.problem_type != "multiple choice":
        raise AttemptFailed("invalid record", f"field 'problem_type': expected 'multiple choice', "
                                              f"got {parsed.problem_type!r}", backoff=False)
    record.update(problem_type=parsed.problem_type, answer=parsed.answer)
    return record


def question_messages(caption: CaptionRecord, index: int, total: int, previous: list[str]) -> list[dict]:
    """The chat messages that ask for question ``index`` (0-based) of ``total`` about ``caption``."""
    variation = ""
    if index > 0 and previous:
        listed = "\n".join("- " + " ".join(p.split()) for p in previous)
        variation = _VARIATION.format(number=index + 1, total=total, previous=listed)
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": QUESTION_PROMPT.format(caption=caption.caption.strip(), variation=variation)}]


def backoff_delay(retry: int, *, base_s: float, max_s: float, rng: random.Random,
                  retry_after: float | None = None) -> float:
    """Seconds before re-ask ``retry`` (0-based): ``base * 2**retry`` capped, scaled into [1/2, 1] at random,
    and at least the server's ``Retry-After`` (capped too)."""
    delay = min(max_s, base_s * 2 ** retry) * (0.5 + 0.5 * rng.random())
    return max(delay, min(retry_after, max_s)) if retry_after is not None else delay


def build_question(endpoint: ChatEndpoint, messages: list[dict], caption: CaptionRecord, problem_id: str,
                   config: BuildConfig, *, sleep=time.sleep, rng: random.Random | None = None):
    """``(record, None)``, or ``(None, (reason, message))`` once the retries are spent."""
    rng = rng or random.Random(config.seed)
    num_retries = 0
    while True:
        try:
            return record_from_reply(extract_json_object(chat_completion(endpoint, messages)), caption, problem_id), None
        except AttemptFailed as e:
            if not e.retryable or num_retries == config.max_retries:
                detail = str(e).replace(endpoint.api_key, "***") if endpoint.api_key else str(e)
                tries = f" after {num_retries + 1} attempts" if num_retries else ""
                return None, (e.reason, f"{caption.source} ({problem_id}): {e.reason}{tries}: {detail}")
            if e.backoff:
                sleep(backoff_delay(num_retries, base_s=config.backoff_s, max_s=config.max_backoff_s, rng=rng,
                                    retry_after=e.retry_after))
            num_retries += 1


def scan_output(path: str, *, log=print) -> dict[str, str]:
    """``problem_id -> problem`` of the records already in ``path`` (empty if it does not exist).

    A last line without its newline is a record cut off by a killed run: it is removed (and ``log`` says
    so) unless it is a complete JSON object. Any other unreadable line raises ``RecordError``.
    """
    if not os.path.exists(path):
        return {}
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            try:
                complete = isinstance(json.loads(data[cut:]), dict)
            except ValueError:
                complete = False
            if complete:
                f.write(b"\n")
                data += b"\n"
            else:
                f.truncate(cut)
                line = data.count(b"\n", 0, cut) + 1
                log(f"{path}:{line}: removed an incomplete last record "
                    f"({len(data) - cut} bytes, from an interrupted run); it will be built again")
                data = data[:cut]
    existing = {}
    for line, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise RecordError(path, line, None, f"not a JSON record ({e}); is --out a file this tool wrote?") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("problem_id"), str):
            raise RecordError(path, line, "problem_id", "missing; is --out a file this tool wrote?")
        existing[obj["problem_id"]] = str(obj.get("problem", ""))
    return existing


def _build_clip(caption: CaptionRecord, existing: dict[str, str], endpoint: ChatEndpoint, config: BuildConfig,
                sleep, rng) -> list[tuple]:
    """Per question of one caption: ``("resumed",)``, ``("built", record)`` or ``("skipped", reason, message)``."""
    outcomes, previous = [], []
    for k in range(config.questions_per_clip):
        problem_id = f"{caption.id}-q{k}"
        if problem_id in existing:
            outcomes.append(("resumed",))
            previous.append(existing[problem_id])
            continue
        messages = question_messages(caption, k, config.questions_per_clip, previous)
        record, skip = build_question(endpoint, messages, caption, problem_id, config, sleep=sleep, rng=rng)
        if record is None:
            outcomes.append(("skipped", *skip))
        else:
            outcomes.append(("built", record))
            previous.append(record["problem"])
    return outcomes


def _map_in_order(fn, items, workers: int):
    """``map(fn, items)`` over ``workers`` threads, results in the order of ``items``."""
    if workers == 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def load_captions(path: str) -> list[CaptionRecord]:
    """The caption records of ``path``; ``OSError`` / ``ValueError`` (naming the file) if it is unusable."""
    try:
        return load_records(path, kind="caption").records
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def build_dataset(captions_path: str, out_path: str, endpoint: ChatEndpoint, config: BuildConfig | None = None,
                  *, sleep=time.sleep, log=print, progress_every: int = 100) -> BuildSummary:
    """Ask ``endpoint`` for the questions of every caption in ``captions_path`` not yet in ``out_path``.

    Appends to ``out_path`` one flushed line per record, in the captions' order. ``log`` gets the
    message about a repaired output file and a progress line every ``progress_every`` captions; the
    returned summary is for the caller to print.
    """
    config = config or BuildConfig()
    captions = load_captions(captions_path)
    if config.limit is not None:
        captions = captions[: config.limit]
    existing = scan_output(out_path, log=log)
    summary = BuildSummary(out_path=out_path, num_captions=len(captions))
    rng = random.Random(config.seed)
    todo, seen = [], set()
    for caption in captions:
        if caption.id in seen:
            summary.skip("duplicate caption id", f"{caption.source}: caption id {caption.id!r} is used by an "
                                                 "earlier caption; its questions would clash",
                         count=config.questions_per_clip)
        else:
            seen.add(caption.id)
            todo.append(caption)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as out:
        clips = _map_in_order(lambda c: _build_clip(c, existing, endpoint, config, sleep, rng), todo, config.workers)
        for done, outcomes in enumerate(clips, start=1):
            for kind, *rest in outcomes:
                if kind == "resumed":
                    summary.num_resumed += 1
                elif kind == "built":
                    out.write(json.dumps(rest[0], ensure_ascii=False) + "\n")
                    out.flush()
                    summary.num_built += 1
                else:
                    summary.skip(*rest)
            if progress_every and done % progress_every == 0 and done < len(todo):
                log(f"captions {done}/{len(todo)}: built {summary.num_built}, resumed {summary.num_resumed}, "
                    f"skipped {summary.num_skipped}")
    return summary
