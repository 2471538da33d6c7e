"""Chat prompts and targets for projector pretraining, CoT-SFT and GRPO.

Template (ChatML turns; each visual input is one placeholder in the text, expanded to its number of
video tokens after tokenization), with a video rendered as the model family's chat template renders it
(:meth:`~megatron_longvideo.data.tokenizer.SpecialTokens.video_item`):

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{visuals}{question}\\n{hint} {format}<|im_end|>\\n<|im_start|>assistant\\n

    a video, LLaVA-OneVision: <video>\\n
    a video, Qwen2.5-VL:      <|vision_start|><|video_pad|><|vision_end|>

``{visuals}`` is one item per visual input, the record's images first, then its videos; none for a
text-only record. An image is a one-frame video (the family's video path, the video placeholder): what
the exported Hugging Face model gives for it passed as a one-frame video.

Responses use ``<think>{reasoning}</think><answer>{answer}</answer>`` followed by ``<|im_end|>``.
The prompt and the response are tokenized separately (so the label boundary is exact and a rollout
continues from exactly the prompt ids an SFT example was trained on).

Contract with the model: ``input_ids`` holds ``tokenizer.video_id`` exactly ``num_video_tokens`` times
in total, one contiguous run per visual input (``visual_spans``, in order); the caller supplies each
visual's count (the model computes frames x tokens_per_frame (+1 newline)), as ints or a callable of the
number of frames.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from megatron_longvideo.data.records import CaptionRecord, VideoQARecord
from megatron_longvideo.data.tokenizer import SpecialTokens, Tokenizer

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt, video, padding)."""

NumVideoTokens = int | Callable[[int], int]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptConfig:
    """Text of the chat template around the video and the question."""

    system_prompt: str = "You are a helpful assistant that watches videos and answers questions about them."
    """The system turn."""

    format_instruction: str = (
        "Think step by step inside <think> </think> tags, then give the final answer inside "
        "<answer> </answer> tags."
    )
    """Appended to every question: asks for the reasoning format."""

    hints: tuple[tuple[str, str], ...] = (
        ("multiple choice", "Answer with the option's letter."),
        ("numerical", "Answer with a number."),
        ("free-form", "Answer in a few words."),
    )
    """Per ``problem_type``, a sentence saying what kind of answer is wanted."""

    caption_instruction: str = "Describe the video."
    """The user turn of a caption (pretraining) example."""

    def __post_init__(self):
        from megatron_longvideo.data.records import PROBLEM_TYPES

        missing = [t for t in PROBLEM_TYPES if t not in dict(self.hints)]
        if missing:
            raise ValueError(f"hints must give a hint for every problem type, missing {missing}")
        if not self.caption_instruction.strip():
            raise ValueError("caption_instruction must be non-empty")


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """What the reward needs to score a rollout of an RL prompt."""

    problem_id: str
    problem_type: str
    answer: str
    """Option letter for multiple choice; the number's text for numerical; free text otherwise."""
    options: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One tokenized prompt (RL) or prompt + target (pretraining, SFT)."""

    input_ids: torch.Tensor
    """[S] int64, the video placeholder id in one run per visual input (``visual_spans``)."""
    labels: torch.Tensor | None
    """[S] int64, ``IGNORE_INDEX`` on the prompt; None for RL prompts."""
    video_start: int
    """Where the first visual input's run starts (-1 for a text-only prompt)."""
    num_video_tokens: int
    """Placeholder tokens of all visual inputs together."""
    num_prompt_tokens: int
    """Length of the prompt part (everything for RL prompts)."""
    ground_truth: GroundTruth | None = None
    visual_spans: tuple[tuple[int, int], ...] = ()
    """``(start, length)`` of each visual input's placeholder run, in order."""


def resolve_num_video_tokens(spec: NumVideoTokens, num_frames: int) -> int:
    """``spec`` itself if an int, else ``spec(num_frames)``; must be a positive int."""
    value = spec(num_frames) if callable(spec) else spec
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_video_tokens must be a positive int, got {value!r} for {num_frames} frames")
    return value


def format_response(reasoning: str | None, answer: str, special: SpecialTokens) -> str:
    """``<think>reasoning</think><answer>answer</answer>`` (empty think span without reasoning)."""
    return (f"{special.think_start}{(reasoning or '').strip()}{special.think_end}"
            f"{special.answer_start}{answer}{special.answer_end}")


def render_prompt(user_text: str, config: PromptConfig, special: SpecialTokens, num_visuals: int = 1) -> str:
    """The prompt string with ``num_visuals`` visual placeholders before ``user_text``, ending where the
    assistant starts."""
    s = special
    return (f"{s.im_start}system\n{config.system_prompt}{s.im_end}\n"
            f"{s.im_start}user\n{s.video_item() * num_visuals}{user_text}{s.im_end}\n"
            f"{s.im_start}assistant\n")


def question_user_text(record: VideoQARecord, config: PromptConfig) -> str:
    """The user turn's text after the video: question (with options), hint, format instruction."""
    return f"{record.question_text}\n{dict(config.hints)[record.problem_type]} {config.format_instruction}"


def render_example_text(record, config: PromptConfig, special: SpecialTokens) -> list[str]:
    """Prompt and target strings of a record, as plain text (for training a tokenizer)."""
    if isinstance(record, CaptionRecord):
        return [render_prompt(config.caption_instruction, config, special), record.caption + special.im_end]
    target = format_response(record.reasoning, record.answer, special) + special.im_end
    return [render_prompt(question_user_text(record, config), config, special, len(record.visuals)), target]


def _counts(num_video_tokens, record) -> list[int]:
    """One placeholder count per visual input of ``record``: ``num_video_tokens`` an int (one visual input)
    or a sequence of ints."""
    counts = [num_video_tokens] if isinstance(num_video_tokens, int) else list(num_video_tokens)
    if len(counts) != len(record.visuals):
        raise ValueError(f"num_video_tokens: {len(counts)} counts for the {len(record.visuals)} visual input(s) "
                         f"of record {getattr(record, 'problem_id', None) or record.id!r}")
    return counts


def _tokenize_prompt(tokenizer: Tokenizer, text: str, counts) -> tuple[list[int], tuple[tuple[int, int], ...]]:
    """Token ids of ``text`` with its visual placeholders expanded to ``counts`` tokens each, and the runs."""
    counts = [counts] if isinstance(counts, int) else list(counts)
    ids = tokenizer.encode(text)
    video_id = tokenizer.video_id
    positions = [i for i, t in enumerate(ids) if t == video_id]
    if len(positions) != len(counts):
        raise ValueError(f"the prompt must hold {len(counts)} video placeholder(s), found {len(positions)}; "
                         "does the question text itself contain the placeholder token?")
    out, spans, last = [], [], 0
    for position, n in zip(positions, counts):
        out += ids[last:position]
        spans.append((len(out), n))
        out += [video_id] * n
        last = position + 1
    return out + ids[last:], tuple(spans)


def _example(prompt_ids, target_ids, spans, ground_truth=None) -> TokenizedExample:
    input_ids = torch.tensor(prompt_ids + target_ids, dtype=torch.long, device="cpu")  # [S]
    labels = None
    if target_ids is not None and ground_truth is None:
        labels = torch.tensor([IGNORE_INDEX] * len(prompt_ids) + target_ids, dtype=torch.long, device="cpu")  # [S]
    return TokenizedExample(input_ids=input_ids, labels=labels, video_start=spans[0][0] if spans else -1,
                            num_video_tokens=sum(n for _, n in spans), num_prompt_tokens=len(prompt_ids),
                            ground_truth=ground_truth, visual_spans=spans)


def _question_prompt(record: VideoQARecord, tokenizer: Tokenizer, num_video_tokens, config: PromptConfig):
    counts = _counts(num_video_tokens, record)
    return _tokenize_prompt(tokenizer, render_prompt(question_user_text(record, config), config, tokenizer.special,
                                                     len(counts)), counts)


def build_sft_example(record: VideoQARecord, tokenizer: Tokenizer, num_video_tokens,
                      config: PromptConfig | None = None) -> TokenizedExample:
    """Prompt + ``<think>reasoning</think><answer>answer</answer><|im_end|>``, loss on the response.
    ``num_video_tokens``: the placeholder count of each visual input (an int for one)."""
    config = config or PromptConfig()
    prompt, spans = _question_prompt(record, tokenizer, num_video_tokens, config)
    target = tokenizer.encode(format_response(record.reasoning, record.answer, tokenizer.special)) + [tokenizer.eos_id]
    return _example(prompt, target, spans)


def build_rl_prompt(record: VideoQARecord, tokenizer: Tokenizer, num_video_tokens,
                    config: PromptConfig | None = None) -> TokenizedExample:
    """The prompt alone (rollouts continue it), with the ground truth for the reward."""
    config = config or PromptConfig()
    prompt, spans = _question_prompt(record, tokenizer, num_video_tokens, config)
    truth = GroundTruth(problem_id=record.problem_id, problem_type=record.problem_type, answer=record.answer,
                        options=record.options)
    return _example(prompt, [], spans, ground_truth=truth)


def build_caption_example(record: CaptionRecord, tokenizer: Tokenizer, num_video_tokens,
                          config: PromptConfig | None = None) -> TokenizedExample:
    """Projector pretraining: "Describe the video." -> caption, loss on the caption."""
    config = config or PromptConfig()
    prompt, spans = _tokenize_prompt(tokenizer, render_prompt(config.caption_instruction, config, tokenizer.special),
                                     _counts(num_video_tokens, record))
    target = tokenizer.encode(record.caption) + [tokenizer.eos_id]
    return _example(prompt, target, spans)
