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
  verified without scanning it all). Every step is ``str.find``/``str.count`` or a regex whose
  quantifiers apply to single characters that adjacent quantified pieces cannot share, so the cost is
  linear in ``max_chars`` whatever the text. Nothing is ever ``eval``'d.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence

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


def extract_answer(text: str, *, max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` pair in the last ``max_chars`` chars."""
    if max_chars <= 0:
        raise ValueError(f"max_chars: must be positive, got {max_chars}")
    text = text[-max_chars:]
    close = text.rfind(ANSWER_CLOSE)
    if close < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, close)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    return text[start : text.find(ANSWER_CLOSE, start)]


def normalize_text(text: str) -> str:
    """NFKC, case-folded, punctuation and symbols turned into spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    chars = [" " if unicodedata.category(c)[0] in "PSZC" else c for c in text]
    return " ".join("".join(chars).split())


# A letter choice: optional "(" or "[", one letter, then the end or a closing ")", "]", ".", ":".
_LETTER_RE = re.compile(r"[(\[]?\s?([A-Za-z])(?:\s?[)\].:]|\s*$)")
# "Answer:", "The answer is", "Option", "choice:" in front of a letter or an option's text.
_ANSWER_PREFIX_RE = re.compile(r"(?:the\s)?(?:answer|option|choice)\b(?:\sis)?\s?:?\s?", re.IGNORECASE)
# One label like "A." / "(A)" / "A)" / "A:" in front of an option's text.
_OPTION_LABEL_RE = re.compile(r"\s?[(\[]?([A-Za-z])[)\].:]\s?")


def _letter_index(letter: str) -> int:
    return ord(letter.upper()) - ord("A")


def parse_choice(text: str, options: Sequence[str]) -> int | None:
    """Index of the chosen option, from a letter ("B", "(b)", "B. blue") or an option's text.

    A letter wins when it names an option (any letter when ``options`` is empty); otherwise the
    text must equal exactly one option's text under ``normalize_text`` (its "A." label removed).
    A leading "Answer:" / "The answer is" / "Option" is ignored when something follows it.
    """
    text = unicodedata.normalize("NFKC", text).strip()
    candidates = [text]
    prefix = _ANSWER_PREFIX_RE.match(text)
    if prefix and prefix.end() < len(text):
        candidates.insert(0, text[prefix.end() :])
    texts = [normalize_text(_strip_option_label(o, i)) for i, o in enumerate(options)]
    for candidate in candidates:
        match = _LETTER_RE.match(candidate)
        if match:
            index = _letter_index(match.group(1))
            if not options or index < len(options):
                return index
        wanted = normalize_text(candidate)
        hits = [i for i, t in enumerate(texts) if wanted and t == wanted]
        if len(hits) == 1:
            return hits[0]
    return None


def _strip_option_label(option: str, index: int) -> str:
    label = _OPTION_LABEL_RE.match(option)
    if label and _letter_index(label.group(1)) == index:
        return option[label.end() :]
    return option


# Sign, integer digits (commas checked below), fraction, exponent. Each quantifier covers one
# character class that the next piece cannot start with, so matching is linear in the text.
_NUMBER_RE = re.compile(r"([-+]?)(?:(\d[\d,]*)(\.\d+)?|(\.\d+))([eE][-+]?\d+)?")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-"})


def parse_number(text: str) -> float | None:
    """The first number in ``text``: "3.5", "1,024" (thousands), "-2", "1e3", "12 seconds" -> 12.

    Commas are thousands separators only when every group after the first has three digits
    ("1,024,000"); otherwise the number ends at the first comma ("1,2" -> 1). No fractions ("1/2"),
    percentages or words ("twelve"). Non-finite values ("1e999") parse as None.
    """
    match = _NUMBER_RE.search(unicodedata.normalize("NFKC", text).translate(_MINUS_SIGNS))
    if match is None:
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
    truth = parse_choice(inp.answer, inp.options)
    if truth is None:
        raise ValueError(
            f"multiple_choice reward: ground-truth answer {inp.answer!r} names no option of {inp.options!r}"
        )
    return 1.0 if parse_choice(answer, inp.options) == truth else 0.0


def numeric_reward(
    inp: RewardInput, *, abs_tol: float = 1e-6, rel_tol: float = 1e-6, max_chars: int = DEFAULT_MAX_CHARS
) -> float:
    """1.0 iff ``|pred - truth| <= max(abs_tol, rel_tol * |truth|)``; pred = first number in the answer."""
    answer = extract_answer(inp.response, max_chars=max_chars)
    if answer is None:
        return 0.0
    truth = parse_number(inp.answer)
    if truth is None:
        raise ValueError(f"numeric reward: ground-truth answer {inp.answer!r} is not a finite number")
    pred = parse_number(answer)
    if pred is None:
        return 0.0
    return 1.0 if abs(pred - truth) <= max(abs_tol, rel_tol * abs(truth)) else 0.0


def exact_match_reward(inp: RewardInput, *, max_chars: int = DEFAULT_MAX_CHARS) -> float:
    """1.0 iff the tagged answer equals the ground truth after ``normalize_text``."""
    answer = extract_answer(inp.response, max_chars=max_chars)
    if answer is None:
        return 0.0
    return 1.0 if normalize_text(answer) == normalize_text(inp.answer) else 0.0


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


def compute_rewards(
    responses: Sequence[str],
    gts: Sequence[GroundTruth],
    spec: Mapping[str, float],
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``total[i] = sum_k w_k * r_k(responses[i], gts[i])`` with ``spec = {name_or_"mod:fn": w_k}``.

    Returns ``total`` [n] and the unweighted parts ``{name: [n]}`` (for logging). A weight of 0
    logs a reward without training on it.
    """
    if len(responses) != len(gts):
        raise ValueError(f"gts: {len(gts)} ground truths for {len(responses)} responses")
    if not spec:
        raise ValueError("spec: at least one reward is required")
    parts: dict[str, torch.Tensor] = {}
    total = torch.zeros(len(responses), dtype=torch.float64, device="cpu")  # [n] host: rewards score text
    for name, weight in spec.items():
        if not math.isfinite(weight):
            raise ValueError(f"spec[{name!r}]: weight {weight} is not finite")
        fn = get_reward(name)
        values = [float(fn(RewardInput.of(r, g))) for r, g in zip(responses, gts)]
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise ValueError(f"reward {name!r} returned a non-finite value {bad[0]}")
        part = torch.tensor(values, dtype=torch.float64, device="cpu")  # [n]
        total += weight * part
        parts[name] = part.to(dtype)
    return total.to(dtype), parts
