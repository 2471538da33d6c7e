"""Rule-based rewards for GRPO: pure functions of a response string and its ground truth.

A reward is any ``Callable[[RewardInput], float]``. Built-ins are registered by name in ``REWARDS``;
``get_reward("pkg.module:function")`` loads a user function with importlib. ``compute_rewards``
evaluates a weighted sum of named rewards over a batch and keeps each part for logging.

Parsing rules (stated once, used by every built-in):

* **Answer tag.** The answer is the content of the *last complete* ``<answer>...</answer>`` pair:
  the last ``<answer>`` that precedes the last ``</answer>``, up to the first ``</answer>`` after it.
  Unclosed trailing tags are ignored; ``<answer><answer>B</answer></answer>`` yields ``"B"``; no
  complete pair yields no answer (accuracy 0). Tags are matched exactly (lower case, no attributes).
* **Format.** ``format_reward`` is 1 only for ``<think>X</think>`` + optional whitespace +
  ``<answer>Y</answer>``, with optional leading/trailing whitespace, and exactly one of each of the
  four tags (so several answer tags, nested or unclosed tags score 0). X and Y may be empty.
* **Caps.** Accuracy rewards scan only the last ``max_chars`` characters of a response (the answer is
  at its end); ``format_reward`` scores 0 for a response longer than ``max_chars`` (it cannot be
  verified without scanning it all). Text is NFKC-normalised once per call and at most ``max_chars``
  characters of it are read, before and after NFKC and case folding (NFKC expands U+FDFA 18 times).
  An answer cut there matches only by what its start decides: a letter closed by ")", "]", ".", ":",
  or a number followed by at least 3 more characters; never by option or free-form text. Before NFKC
  a run of more than 30 combining characters keeps its first 30 (the UAX #15 stream-safe limit: NFKC
  sorts a run in quadratic time). Every other step is ``str.find``/``str.count``/``str.translate`` or
  a regex whose quantifiers apply to single characters that adjacent quantified pieces cannot share,
  so a call costs a small multiple of scoring plain text of the same length, whatever the text.
  Nothing is ever ``eval``'d.
* **Ground truths.** ``check_ground_truth`` says why a record cannot be scored (an answer that names
  no option, is not a number, is empty; an unknown problem type), as a short reason to count skips
  by. Called directly, the accuracy rewards raise ``ValueError`` on such a record.
* **Failures.** ``compute_rewards(..., failures=[])`` never raises for one bad record or reward call:
  an unscorable ground truth, a reward that raises, returns a non-number or non-finite value, or
  (user rewards, ``time_limit_s``) runs too long is listed as a ``RewardFailure`` and that response's
  total is NaN, for the caller to drop its group.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib
import math
import queue
import re
import threading
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch

DEFAULT_MAX_CHARS = 65_536

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroundTruth:
    """What a record says is right; one per prompt (shared by the G responses of its group)."""

    answer: str
    """The correct answer: a letter ("B") for multiple choice, a number as text for numeric, else text."""
    problem_type: str = "multiple_choice"
    """One of ``PROBLEM_TYPES``; selects the rule used by the ``accuracy`` reward."""
    options: tuple[str, ...] = ()
    """Multiple-choice option texts in letter order (A, B, ...); a leading "A." label is allowed."""

    @classmethod
    def from_record(cls, truth) -> "GroundTruth":
        """From the data side's ground truth (``megatron_longvideo.data.prompts.GroundTruth``: problem
        types "multiple choice" / "numerical" / "free-form", options as (letter, text) pairs)."""
        kinds = {"multiple choice": "multiple_choice", "numerical": "numeric", "free-form": "free_form"}
        kind = kinds.get(truth.problem_type, truth.problem_type)
        options = tuple(o if isinstance(o, str) else o[1] for o in truth.options)
        return cls(answer=str(truth.answer), problem_type=kind, options=options)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardInput:
    """One response with its ground truth: the single argument of every reward function."""

    response: str
    """The generated text, as decoded."""
    answer: str
    """See ``GroundTruth.answer``."""
    problem_type: str = "multiple_choice"
    """See ``GroundTruth.problem_type``."""
    options: tuple[str, ...] = ()
    """See ``GroundTruth.options``."""

    @classmethod
    def of(cls, response: str, gt: GroundTruth) -> "RewardInput":
        """The input for ``response`` scored against the ground truth of its prompt."""
        return cls(response=response, answer=gt.answer, problem_type=gt.problem_type, options=tuple(gt.options))


RewardFn = Callable[[RewardInput], float]


# ----------------------------------------------------------------------------------------------
# Parsing helpers


def _check_max_chars(max_chars: int) -> None:
    if max_chars <= 0:
        raise ValueError(f"max_chars: must be positive, got {max_chars}")


def extract_answer(text: str, *, max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` pair in the last ``max_chars`` chars."""
    _check_max_chars(max_chars)
    text = text[-max_chars:]
    close = text.rfind(ANSWER_CLOSE)
    if close < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, close)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    return text[start : text.find(ANSWER_CLOSE, start)]


_MAX_NON_STARTERS = 30
"""Longest run of combining characters (non-starters) kept before NFKC: the UAX #15 stream-safe
limit, which no real text exceeds. CPython sorts a run by insertion, so a 64K-character run of
alternating combining classes would take seconds."""
_NFKC_MAX_EXPANSION = 18
"""Most characters NFKC makes of one (U+FDFA); sizes the first prefix ``_nfkc`` normalises."""
_NFKC_MARGIN = 1024
"""Characters at the end of a prefix's NFKC that the text after the prefix may still change. After
``_cut_non_starter_runs`` that is at most one starter's expansion (18) plus its run of combining marks
(3 + 2 * 30): well under this."""
_MARK_RUN_RE = re.compile("\0{%d,}" % (_MAX_NON_STARTERS + 1))


@functools.cache
def _non_starter_marks() -> dict[int, int]:
    """``str.translate`` table: every character whose compatibility decomposition starts with a
    non-starter (canonical combining class > 0) -> NUL, and NUL itself -> U+0001. Built once (~0.2 s)."""
    table = {}
    for code in range(0x110000):
        c = chr(code)
        if unicodedata.combining(c) or (
            unicodedata.decomposition(c) and unicodedata.combining(unicodedata.normalize("NFKD", c)[0])
        ):
            table[code] = 0
    table[0] = 1
    return table


def _cut_non_starter_runs(text: str) -> str:
    """``text`` with each run of more than ``_MAX_NON_STARTERS`` combining characters cut to that many."""
    if len(text) <= _MAX_NON_STARTERS:
        return text
    marks = text.translate(_non_starter_marks())  # same length; NUL where text has a non-starter
    if "\0" * (_MAX_NON_STARTERS + 1) not in marks:
        return text
    pieces, start = [], 0
    for run in _MARK_RUN_RE.finditer(marks):
        pieces.append(text[start : run.start() + _MAX_NON_STARTERS])
        start = run.end()
    pieces.append(text[start:])
    return "".join(pieces)


def _nfkc(text: str, max_chars: int) -> tuple[str, bool]:
    """NFKC of the first ``max_chars`` characters of ``text`` (combining runs cut, see the module doc),
    itself cut to ``max_chars``; and whether anything was cut. Normalises growing prefixes until the
    result is long enough, so an expanding text costs about ``max_chars`` output characters, not 18x."""
    cut = len(text) > max_chars
    text = text[:max_chars]
    if text.isascii():  # ASCII is NFKC already
        return text, cut
    target = max_chars + _NFKC_MARGIN
    k = min(len(text), target // _NFKC_MAX_EXPANSION + 1)
    while True:  # a prefix's runs cut alike, but for the run it ends in: within the margin
        out = unicodedata.normalize("NFKC", _cut_non_starter_runs(text[:k]))
        if k == len(text):
            break
        if len(out) >= target:  # its first max_chars characters are those of the whole text's NFKC
            cut = True
            break
        k = min(len(text), max(2 * k, math.ceil(1.1 * k * target / max(len(out), 1))))
    if len(out) > max_chars:
        out, cut = out[:max_chars], True
    return out, cut


def _fold(text: str, max_chars: int) -> tuple[str, bool]:
    """``normalize_text`` of text that is NFKC already, reading at most ``max_chars`` case-folded
    characters; and whether it was cut there (case folding can triple a text)."""
    text = text.casefold()
    cut = len(text) > max_chars
    chars = [" " if unicodedata.category(c)[0] in "PSZC" else c for c in text[:max_chars]]
    return " ".join("".join(chars).split()), cut


def _normalize(text: str, max_chars: int) -> tuple[str, bool]:
    text, cut = _nfkc(text, max_chars)
    text, folded_cut = _fold(text, max_chars)
    return text, cut or folded_cut


def normalize_text(text: str, *, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """NFKC, case-folded, punctuation and symbols turned into spaces, whitespace collapsed.

    Reads at most ``max_chars`` characters of the text, of its NFKC form and of its case folding.
    """
    _check_max_chars(max_chars)
    return _normalize(text, max_chars)[0]


# A letter choice: optional "(" or "[", one letter, then the end or a closing ")", "]", ".", ":"
# (group 2; None when the end decided it).
_LETTER_RE = re.compile(r"[(\[]?\s?([A-Za-z])(?:\s?([)\].:])|\s*$)")
# "Answer:", "The answer is", "Option", "choice:" in front of a letter or an option's text.
_ANSWER_PREFIX_RE = re.compile(r"(?:the\s)?(?:answer|option|choice)\b(?:\sis)?\s?:?\s?", re.IGNORECASE)
# One label like "A." / "(A)" / "A)" / "A:" in front of an option's text.
_OPTION_LABEL_RE = re.compile(r"\s?[(\[]?([A-Za-z])[)\].:]\s?")


def _letter_index(letter: str) -> int:
    return ord(letter.upper()) - ord("A")


def parse_choice(text: str, options: Sequence[str], *, max_chars: int = DEFAULT_MAX_CHARS) -> int | None:
    """Index of the chosen option, from a letter ("B", "(b)", "B. blue") or an option's text.

    A letter wins when it names an option (any letter when ``options`` is empty); otherwise the
    text must equal exactly one option's text under ``normalize_text`` (its "A." label removed).
    A leading "Answer:" / "The answer is" / "Option" is ignored when something follows it. Reads at
    most ``max_chars`` characters of the text and of its NFKC form (a cut text: see the module doc).
    """
    _check_max_chars(max_chars)
    text, cut = _nfkc(text, max_chars)
    text = text.strip()
    texts = _option_texts(tuple(options), max_chars)
    candidates = [text]
    prefix = _ANSWER_PREFIX_RE.match(text)
    if prefix and prefix.end() < len(text):
        candidates.insert(0, text[prefix.end() :])
    for candidate in candidates:
        match = _LETTER_RE.match(candidate)
        if match and (match.group(2) is not None or not cut):  # a cut text has no known end
            index = _letter_index(match.group(1))
            if not options or index < len(options):
                return index
        if cut:
            continue
        wanted, wanted_cut = _fold(candidate, max_chars)
        hits = [i for i, t in enumerate(texts) if wanted and not wanted_cut and t == wanted]
        if len(hits) == 1:
            return hits[0]
    return None


@functools.lru_cache(maxsize=256)
def _option_texts(options: tuple[str, ...], max_chars: int) -> tuple[str | None, ...]:
    """Each option's text under ``normalize_text``, its label removed; None for one cut at ``max_chars``.
    Cached: the G responses of a group share their options."""
    texts = (_normalize(_strip_option_label(o, i), max_chars) for i, o in enumerate(options))
    return tuple(None if cut else t for t, cut in texts)


def _strip_option_label(option: str, index: int) -> str:
    label = _OPTION_LABEL_RE.match(option)
    if label and _letter_index(label.group(1)) == index:
        return option[label.end() :]
    return option


# Sign, integer digits (commas checked below), fraction, exponent. Each quantifier covers one
# character class that the next piece cannot start with, so matching is linear in the text.
_NUMBER_RE = re.compile(r"([-+]?)(?:(\d[\d,]*)(\.\d+)?|(\.\d+))([eE][-+]?\d+)?")
_MINUS_SIGNS = ("\u2212", "\u2013", "\ufe63", "\uff0d")  # read as "-"


def parse_number(text: str, *, max_chars: int = DEFAULT_MAX_CHARS) -> float | None:
    """The first number in ``text``: "3.5", "1,024" (thousands), "-2", "1e3", "12 seconds" -> 12.

    Commas are thousands separators only when every group after the first has three digits
    ("1,024,000"); otherwise the number ends at the first comma ("1,2" -> 1). No fractions ("1/2"),
    percentages or words ("twelve"). Non-finite values ("1e999") parse as None. Reads at most
    ``max_chars`` characters of the text and of its NFKC form; in a text cut there, a number needs
    3 characters after it (it might go on), so a number at most ``max_chars`` long costs one
    ``float`` of that many digits, linear in them.
    """
    _check_max_chars(max_chars)
    text, cut = _nfkc(text, max_chars)
    for minus in _MINUS_SIGNS:
        text = text.replace(minus, "-")
    match = _NUMBER_RE.search(text)
    if match is None or (cut and len(text) - match.end() < 3):  # "12e-" + cut: the exponent may go on
        return None
    sign, int_part, frac, lead_frac, exp = match.groups()
    if int_part is None:
        token = sign + lead_frac + (exp or "")
    else:
        digits = int_part.rstrip(",")
        tail = (frac or "") + (exp or "") if digits == int_part else ""
        groups = digits.split(",")
        if len(groups) > 1 and not (len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:])):
            digits, tail = groups[0], ""
        token = sign + digits.replace(",", "") + tail
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# Built-in rewards


def format_reward(inp: RewardInput, *, max_chars: int = DEFAULT_MAX_CHARS) -> float:
    """1.0 iff the response is exactly ``<think>...</think><answer>...</answer>`` (see module doc)."""
    text = inp.response
    if len(text) > max_chars:
        return 0.0
    text = text.strip()
    if any(text.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
        return 0.0
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return 0.0
    think_close = text.find(THINK_CLOSE)
    answer_open = text.find(ANSWER_OPEN)
    if answer_open < think_close:
        return 0.0
    between = text[think_close + len(THINK_CLOSE) : answer_open]
    return 1.0 if between.strip() == "" else 0.0


def multiple_choice_reward(inp: RewardInput, *, max_chars: int = DEFAULT_MAX_CHARS) -> float:
    """1.0 iff the tagged answer picks the same option as the ground truth (letter or option text)."""
    answer = extract_answer(inp.response, max_chars=max_chars)
    if answer is None:
        return 0.0
    options = tuple(inp.options)
    truth = parse_choice(inp.answer, options, max_chars=max_chars)
    if truth is None:
        raise ValueError(
            f"multiple_choice reward: ground-truth answer {_short(inp.answer)} names no option of {_short(options)}"
        )
    return 1.0 if parse_choice(answer, options, max_chars=max_chars) == truth else 0.0


def numeric_reward(
    inp: RewardInput, *, abs_tol: float = 1e-6, rel_tol: float = 1e-6, max_chars: int = DEFAULT_MAX_CHARS
) -> float:
    """1.0 iff ``|pred - truth| <= max(abs_tol, rel_tol * |truth|)``; pred = first number in the answer."""
    answer = extract_answer(inp.response, max_chars=max_chars)
    if answer is None:
        return 0.0
    truth = parse_number(inp.answer, max_chars=max_chars)
    if truth is None:
        raise ValueError(f"numeric reward: ground-truth answer {_short(inp.answer)} is not a finite number")
    pred = parse_number(answer, max_chars=max_chars)
    if pred is None:
        return 0.0
    return 1.0 if abs(pred - truth) <= max(abs_tol, rel_tol * abs(truth)) else 0.0


def exact_match_reward(inp: RewardInput, *, max_chars: int = DEFAULT_MAX_CHARS) -> float:
    """1.0 iff the tagged answer equals the ground truth after ``normalize_text`` (neither cut)."""
    answer = extract_answer(inp.response, max_chars=max_chars)
    if answer is None:
        return 0.0
    got, got_cut = _normalize(answer, max_chars)
    want, want_cut = _normalize(inp.answer, max_chars)
    return 1.0 if got == want and not (got_cut or want_cut) else 0.0


def _short(value, limit: int = 120) -> str:
    """``repr(value)`` on one line, cut to about ``limit`` characters (for messages)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


_ACCURACY_BY_TYPE: dict[str, RewardFn] = {
    "multiple_choice": multiple_choice_reward,
    "numeric": numeric_reward,
    "free_form": exact_match_reward,
}
PROBLEM_TYPES = tuple(_ACCURACY_BY_TYPE)


def accuracy_reward(inp: RewardInput) -> float:
    """The accuracy rule chosen by ``inp.problem_type`` (one of ``PROBLEM_TYPES``)."""
    fn = _ACCURACY_BY_TYPE.get(inp.problem_type)
    if fn is None:
        raise ValueError(f"problem_type: {inp.problem_type!r} is not one of {PROBLEM_TYPES}")
    return fn(inp)


# ----------------------------------------------------------------------------------------------
# Registry and batch evaluation

REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "multiple_choice": multiple_choice_reward,
    "numeric": numeric_reward,
    "exact_match": exact_match_reward,
}


def register_reward(name: str, fn: RewardFn) -> RewardFn:
    """Add ``fn`` to ``REWARDS`` under ``name`` (an existing name is an error)."""
    if not name or ":" in name:
        raise ValueError(f"reward name: {name!r} must be non-empty and contain no ':'")
    if name in REWARDS:
        raise ValueError(f"reward name: {name!r} is already registered")
    REWARDS[name] = fn
    return fn


def get_reward(spec: str) -> RewardFn:
    """A registered reward by name, or a user function by ``"package.module:function"``."""
    if ":" not in spec:
        if spec not in REWARDS:
            raise ValueError(f"reward {spec!r}: unknown name; known: {sorted(REWARDS)}, or 'module:function'")
        return REWARDS[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"reward spec {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a broken user module is a bad spec too; the cause stays chained
        raise ValueError(f"reward spec {spec!r}: cannot import module {module_name!r} ({err})") from err
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward spec {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward spec {spec!r}: {attr!r} is not callable")
    return fn


_BUILTIN_REWARDS = frozenset(REWARDS.values())
"""Bounded by construction (module doc): never run under ``compute_rewards``' timer."""
_KIND_OF_REWARD = {multiple_choice_reward: "multiple_choice", numeric_reward: "numeric", exact_match_reward: "free_form"}
"""The kind of ground truth each built-in accuracy reward reads (``accuracy``: by ``problem_type``)."""


def check_ground_truth(gt, spec: Mapping[str, float] | Sequence[str] | None = None) -> str | None:
    """Why ``gt`` cannot be scored by the rewards of ``spec`` (names or a ``compute_rewards`` spec;
    None: the ``accuracy`` reward), as a short stable reason to count skips by; None if it can.

    ``gt`` is a ``GroundTruth`` or the data side's ground truth (converted by ``from_record``). Reasons:
    ``"ground truth: malformed"``, ``"... unparsable options"``, ``"... unknown problem type"``,
    ``"... empty answer"``, ``"... answer names no option"``, ``"... answer is not a number"``.
    Only built-in accuracy rewards read the answer; ``format`` and user rewards accept any. Never raises.
    """
    problem = _ground_truth_problem(gt, ("accuracy",) if spec is None else tuple(spec))
    return None if problem is None else problem[0]


def _ground_truth_problem(gt, names: Sequence[str]) -> tuple[str, str, str] | None:
    """(reason, what is wrong, the reward that needs it) or None; see ``check_ground_truth``."""
    try:
        if not isinstance(gt, GroundTruth):
            gt = GroundTruth.from_record(gt)
        options = gt.options
        if isinstance(options, str) or not all(isinstance(o, str) for o in options):
            return "ground truth: unparsable options", f"options {_short(options)} are not texts", names[0]
        for name in names:
            fn = REWARDS.get(name) if ":" not in name else None
            if fn is accuracy_reward:
                kind = _KIND_OF_REWARD.get(_ACCURACY_BY_TYPE.get(gt.problem_type))
                if kind is None:
                    return ("ground truth: unknown problem type",
                            f"problem_type {_short(gt.problem_type)} is not one of {PROBLEM_TYPES}", name)
            else:
                kind = _KIND_OF_REWARD.get(fn)
            if kind is None:
                continue
            answer = gt.answer
            if not isinstance(answer, str):
                return "ground truth: malformed", f"answer {_short(answer)} is not text", name
            if not answer.strip() or (kind == "free_form" and not normalize_text(answer)):
                return "ground truth: empty answer", f"answer {_short(answer)} is empty once normalised", name
            if kind == "multiple_choice" and parse_choice(answer, options) is None:
                return ("ground truth: answer names no option",
                        f"answer {_short(answer)} names no option of {_short(tuple(options))}", name)
            if kind == "numeric" and parse_number(answer) is None:
                return "ground truth: answer is not a number", f"answer {_short(answer)} is not a finite number", name
    except Exception as err:  # whatever it is, it is not a ground truth the rewards can read
        return "ground truth: malformed", f"cannot be read ({type(err).__name__}: {_one_line(str(err))})", names[0]
    return None


class RewardFailure(NamedTuple):
    """A response ``compute_rewards`` could not score (its total is NaN)."""

    index: int
    """Position of the response in the batch."""
    reason: str
    """Short and stable, to count by: ``"reward: error"``, ``"reward: timeout"``, ``"reward: non-finite"``,
    ``"reward: not a number"``, or a ``check_ground_truth`` reason (``"ground truth: ..."``)."""
    message: str
    """One line naming the reward, the record and what went wrong (exception type and text)."""


class _Timeout(Exception):
    """A timed reward call that had not returned in time (not ``TimeoutError``: fn may raise that)."""


class _Worker:
    """A daemon thread that runs reward calls one at a time, so that the caller can stop waiting.

    Python cannot kill a thread: a call that times out is abandoned, left to finish (or hang) in this
    thread, which then exits; the next call gets a fresh worker, so a stuck call never blocks the
    ones after it, and a daemon thread never blocks the interpreter's exit. A call stuck in C code
    that holds the GIL (a catastrophic ``re`` match) stalls the whole process: no in-process timer can
    help there. Threads, not ``signal.alarm``: it works in any thread of a training process.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="reward-worker", daemon=True).start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, arg, future = job
            del job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(arg))
                except BaseException as err:  # handed to the caller, which reports or re-raises it
                    future.set_exception(err)
            del fn, arg, future

    def call(self, fn: RewardFn, inp: RewardInput, time_limit_s: float):
        """``fn(inp)``, or ``_Timeout`` if it has not returned within ``time_limit_s`` (then close this worker)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, inp, future))
        done, _ = concurrent.futures.wait([future], timeout=time_limit_s)
        if not done:
            raise _Timeout
        return future.result()  # re-raises fn's own exception

    def close(self) -> None:
        """Let the thread exit once its current call, if any, returns."""
        self._jobs.put(None)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit]}..."


def compute_rewards(
    responses: Sequence[str],
    gts: Sequence[GroundTruth],
    spec: Mapping[str, float],
    *,
    dtype: torch.dtype = torch.float32,
    failures: list | None = None,
    ids: Sequence[str] | None = None,
    time_limit_s: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``total[i] = sum_k w_k * r_k(responses[i], gts[i])`` with ``spec = {name_or_"mod:fn": w_k}``.

    Returns ``total`` [n] and the unweighted parts ``{name: [n]}`` (for logging). A weight of 0
    logs a reward without training on it. ``ids[i]`` names record i in messages.

    A response fails when its ground truth cannot be scored (``check_ground_truth``, checked first),
    or a reward call raises, returns a non-number or a non-finite value, or (rewards other than the
    built-ins, which are bounded; only with ``time_limit_s``) has not returned after ``time_limit_s``
    seconds, which abandons the call (``_Worker``: a stuck call keeps a daemon thread). Without
    ``failures`` the first failure raises ``ValueError`` naming the reward and record. With a list,
    one ``RewardFailure`` per failed response is appended, in index order; that response's total is
    NaN and so are its parts from the failed reward on (the rewards after it are not called).
    """
    if len(responses) != len(gts):
        raise ValueError(f"gts: {len(gts)} ground truths for {len(responses)} responses")
    if not spec:
        raise ValueError("spec: at least one reward is required")
    if ids is not None and len(ids) != len(responses):
        raise ValueError(f"ids: {len(ids)} ids for {len(responses)} responses")
    if time_limit_s is not None and not (math.isfinite(time_limit_s) and time_limit_s > 0):
        raise ValueError(f"time_limit_s: must be positive and finite, got {time_limit_s}")
    for name, weight in spec.items():
        if not math.isfinite(weight):
            raise ValueError(f"spec[{name!r}]: weight {weight} is not finite")
    fns = {name: get_reward(name) for name in spec}
    n = len(responses)
    failed: dict[int, RewardFailure] = {}

    def record(i: int) -> str:
        return f"record {ids[i]!r}" if ids is not None else f"response {i}"

    def fail(i: int, reason: str, message: str, cause: BaseException | None = None) -> None:
        if failures is None:
            raise ValueError(message) from cause
        failed[i] = RewardFailure(i, reason, message)

    problems: dict[int, tuple[str, str, str] | None] = {}  # by id(gt): a group shares one
    for i, gt in enumerate(gts):
        if id(gt) not in problems:
            problems[id(gt)] = _ground_truth_problem(gt, tuple(spec))
        problem = problems[id(gt)]
        if problem is not None:
            reason, what, name = problem
            fail(i, reason, f"reward {name!r} on {record(i)}: ground truth {what}")

    parts: dict[str, torch.Tensor] = {}
    total = torch.zeros(n, dtype=torch.float64, device="cpu")  # [n] host: rewards score text
    worker: _Worker | None = None
    try:
        for name, weight in spec.items():
            fn = fns[name]
            timed = time_limit_s is not None and fn not in _BUILTIN_REWARDS
            values = [math.nan] * n
            for i, (response, gt) in enumerate(zip(responses, gts)):
                if i in failed:
                    continue
                where = f"reward {name!r} on {record(i)}"
                try:
                    inp = RewardInput.of(response, gt)
                    if timed:
                        worker = worker or _Worker()
                        value = worker.call(fn, inp, time_limit_s)
                    else:
                        value = fn(inp)
                except _Timeout:
                    worker.close()  # abandoned with its call; the next timed call gets a fresh one
                    worker = None
                    fail(i, "reward: timeout",
                         f"{where}: no result within {time_limit_s:g} s (call abandoned; it may still be running)")
                    continue
                except Exception as err:
                    fail(i, "reward: error", f"{where}: {type(err).__name__}: {_one_line(str(err))}", err)
                    continue
                try:
                    if isinstance(value, (str, bytes, bytearray)):
                        raise TypeError
                    number = float(value)
                except Exception as err:
                    fail(i, "reward: not a number",
                         f"{where}: returned {type(value).__name__} {_short(value)}, not a number", err)
                    continue
                if not math.isfinite(number):
                    fail(i, "reward: non-finite", f"{where}: returned a non-finite value {number}")
                    continue
                values[i] = number
            part = torch.tensor(values, dtype=torch.float64, device="cpu")  # [n]
            total += weight * part
            parts[name] = part.to(dtype)
    finally:
        if worker is not None:
            worker.close()
    if failed:
        total[list(failed)] = math.nan
        failures.extend(failed[i] for i in sorted(failed))
    return total.to(dtype), parts
