"""Evaluation of a video-language policy on a LongVideo-Reason-style test file: greedy answers, scored.

Two halves:

* **Scoring**, pure functions of text: :func:`score_prediction` (a response -> the content of its answer
  tag, whether it is right by the ``accuracy`` reward's rule, whether it has the ``format`` reward's shape)
  and :func:`summarize` (per-category and overall accuracy, format rate, counts), so a test checks them
  against a hand count. The rules are those of :mod:`megatron_longvideo.rl.rewards`: what GRPO trains on
  is what evaluation counts.
* **Generation** (:func:`evaluate`, collective over all ranks): each data-parallel replica takes every
  ``dp_size``-th record; its ranks build the prompt embeddings together (the videos encoded over the
  encode group, as in training) and decode greedily with the ``megatron`` engine on the policy itself,
  the replica's CP ranks each taking a contiguous share of a batch
  (:func:`~megatron_longvideo.rl.rollout.generate_groups`). The scored rows are gathered to every rank
  in record order. Greedy decoding has no seed, so the predictions do not depend on the layout.

Categories: the public LongVideo-Reason test split holds the reasoning perspective of a question
(``temporal``, ``goal``, ``plot``, ``spatial``) in ``problem_type``, the field our records use for the
answer type. :func:`load_eval_records` reads the category from ``category_field`` (default
``problem_type``); a ``problem_type`` that is not an answer type is left out when the record is parsed,
and the answer type inferred (inline options make it multiple choice). A record without the category
field is in category ``all``.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_longvideo.data.errors import RecordError, SkipReport, check_on_error
from megatron_longvideo.data.records import iter_json_objects, parse_qa_record
from megatron_longvideo.rl.rewards import GroundTruth, RewardInput, accuracy_reward, extract_answer, format_reward

__all__ = ["DEFAULT_CATEGORY_FIELD", "NO_CATEGORY", "Scored", "score_prediction", "summarize", "eval_scalars",
           "format_table", "load_eval_records", "EvalSet", "build_eval_set", "EvalResult", "evaluate",
           "response_text"]

DEFAULT_CATEGORY_FIELD = "problem_type"
"""Where the public LongVideo-Reason test split keeps a question's perspective (temporal / goal / plot / spatial)."""
NO_CATEGORY = "all"
"""The category of a record without the category field."""


# -- scoring ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Scored:
    """One response judged against its ground truth."""

    extracted: Optional[str]
    """Content of the last complete ``<answer>...</answer>`` pair (None: no complete pair)."""
    correct: bool
    """The ``accuracy`` reward's verdict (option letter or text, number within tolerance, or exact text)."""
    formatted: bool
    """The ``format`` reward's: exactly ``<think>...</think><answer>...</answer>``."""


def score_prediction(text: str, truth: GroundTruth) -> Scored:
    """``text`` (a decoded response) scored against ``truth`` by the rules of :mod:`megatron_longvideo.rl.rewards`."""
    inp = RewardInput.of(text, truth)
    return Scored(extracted=extract_answer(text), correct=accuracy_reward(inp) == 1.0, formatted=format_reward(inp) == 1.0)


def _counts(rows: Sequence[dict]) -> dict:
    num = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    formatted = sum(bool(r["formatted"]) for r in rows)
    return {"num_records": num, "num_correct": correct, "num_formatted": formatted,
            "accuracy": correct / num if num else 0.0, "format_rate": formatted / num if num else 0.0}


def summarize(rows: Sequence[dict]) -> dict:
    """Metrics of scored rows (dicts with ``category``, ``correct``, ``formatted``; a row with ``skipped``
    set is counted apart, in no accuracy): ``{"overall": counts, "categories": {name: counts}, "num_skipped"}``,
    counts being ``num_records``, ``num_correct``, ``num_formatted``, ``accuracy``, ``format_rate``.
    Categories are sorted by name."""
    scored = [r for r in rows if not r.get("skipped")]
    by_category: dict[str, list] = collections.defaultdict(list)
    for r in scored:
        by_category[r["category"]].append(r)
    return {"overall": _counts(scored), "categories": {c: _counts(by_category[c]) for c in sorted(by_category)},
            "num_skipped": len(rows) - len(scored)}


def _tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()) or "_"


def eval_scalars(metrics: dict, prefix: str = "eval") -> dict[str, float]:
    """The numbers of :func:`summarize` to log: ``eval/accuracy``, ``eval/format_rate``, ``eval/num_records``
    and ``eval/<category>/accuracy`` (the category's name with characters other than letters, digits,
    ``_ . -`` as ``_``)."""
    o = metrics["overall"]
    out = {f"{prefix}/accuracy": o["accuracy"], f"{prefix}/format_rate": o["format_rate"],
           f"{prefix}/num_records": float(o["num_records"])}
    for name, c in metrics["categories"].items():
        out[f"{prefix}/{_tag(name)}/accuracy"] = c["accuracy"]
    return out


def format_table(metrics: dict) -> str:
    """A small text table: one line per category, then the overall line."""
    lines = [f"{'category':<20} {'records':>8} {'accuracy':>9} {'format':>7}"]
    for name, c in [*metrics["categories"].items(), ("overall", metrics["overall"])]:
        lines.append(f"{name[:20]:<20} {c['num_records']:>8} {c['accuracy']:>9.3f} {c['format_rate']:>7.3f}")
    if metrics.get("num_skipped"):
        lines.append(f"({metrics['num_skipped']} records skipped: bad video)")
    return "\n".join(lines)


# -- records ------------------------------------------------------------------------------------------
def load_eval_records(path: str, *, video_root: Optional[str] = None, category_field: str = DEFAULT_CATEGORY_FIELD,
                      on_error: str = "raise", skip_report: Optional[SkipReport] = None) -> tuple[list, list[str]]:
    """The question records of ``path`` and the category of each (see the module docstring): ``(records,
    categories)``. Bad records raise ``RecordError`` naming file, line and field, or with ``on_error="skip"``
    are dropped and counted in ``skip_report``. A repeated ``problem_id`` is an error."""
    check_on_error(on_error)
    records, categories, seen = [], [], {}
    for line, obj in iter_json_objects(path):
        try:
            if isinstance(obj, RecordError):
                raise obj
            category = NO_CATEGORY
            if isinstance(obj, dict) and obj.get(category_field) not in (None, ""):
                category = str(obj[category_field]).strip() or NO_CATEGORY
            try:
                rec = parse_qa_record(obj, path=path, line=line, video_root=video_root)
            except RecordError as e:
                if e.field != "problem_type" or not isinstance(obj, dict):
                    raise
                # a perspective (the public test split), not an answer type: the answer type is inferred
                rec = parse_qa_record({k: v for k, v in obj.items() if k != "problem_type"}, path=path, line=line,
                                      video_root=video_root)
            if rec.problem_id in seen:
                raise RecordError(path, line, "problem_id", f"duplicate {rec.problem_id!r} (first at line {seen[rec.problem_id]})")
            seen[rec.problem_id] = line
        except RecordError as e:
            if on_error == "raise":
                raise
            if skip_report is not None:
                skip_report.add_record_errors([e])
            continue
        records.append(rec)
        categories.append(category)
    if not records:
        raise ValueError(f"{path}: no usable question record to evaluate")
    return records, categories


@dataclasses.dataclass
class EvalSet:
    """A test file ready to evaluate: its ``rl``-mode dataset and each record's category."""

    dataset: object
    """A :class:`~megatron_longvideo.data.dataset.LongVideoDataset` (mode ``rl``)."""
    categories: list[str]
    path: str


def build_eval_set(path: str, *, tokenizer, num_video_tokens, video_root: str, sampling,
                   category_field: str = DEFAULT_CATEGORY_FIELD, on_error: str = "raise",
                   skip_report: Optional[SkipReport] = None, decode: str = "full", shard=None,
                   num_audio_tokens=None, audio=None, probe_dir: Optional[str] = None) -> EvalSet:
    """The :class:`EvalSet` of ``path`` (``sampling``: the frame sampling, as for training). ``decode``:
    ``full`` or ``sharded`` (each rank of the encode group decodes its slice, ``shard``:
    :func:`~megatron_longvideo.models.encode.encode_shard`). ``num_audio_tokens``, ``audio`` (an
    ``AudioSamplingConfig``) and ``probe_dir``: as the dataset takes them
    (:func:`~megatron_longvideo.training.args.dataset_media`)."""
    from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig

    records, categories = load_eval_records(path, video_root=video_root, category_field=category_field,
                                            on_error=on_error, skip_report=skip_report)
    if decode not in ("full", "sharded"):
        raise ValueError(f"decode must be 'full' or 'sharded', got {decode!r}")
    config = VideoDatasetConfig(mode="rl", video_root=video_root, sampling=sampling, on_error=on_error,
                                decode="lazy" if decode == "sharded" else "full", probe_dir=probe_dir,
                                **({} if audio is None else {"audio": audio}))
    dataset = LongVideoDataset(records, tokenizer=tokenizer, num_video_tokens=num_video_tokens, config=config,
                               skip_report=skip_report, num_audio_tokens=num_audio_tokens)
    dataset.set_shard(shard if decode == "sharded" else None)
    return EvalSet(dataset=dataset, categories=categories, path=path)


# -- generation ---------------------------------------------------------------------------------------
def response_text(tokenizer, ids: Sequence[int], stop_token_ids: Sequence[int] = ()) -> str:
    """A response's text as the rewards see it: without the stop token that ended it, and without ids of
    a vocabulary padded past the tokenizer's (what the GRPO trainer scores)."""
    ids = list(ids)
    if ids and ids[-1] in stop_token_ids:
        ids = ids[:-1]
    return tokenizer.decode([t for t in ids if t < tokenizer.vocab_size])


@dataclasses.dataclass
class EvalResult:
    """What :func:`evaluate` returns, the same on every rank."""

    rows: list[dict]
    """One per record, in file order: ``index``, ``id``, ``category``, ``problem_type``, ``answer``,
    ``prediction``, ``extracted``, ``correct``, ``formatted`` (and ``skipped``, the reason, for a record
    whose video could not be used under ``on_error="skip"``)."""
    metrics: dict
    """:func:`summarize` of the rows."""


def _row(index: int, record, category: str) -> dict:
    return {"index": index, "id": record.problem_id, "category": category, "problem_type": record.problem_type,
            "answer": record.answer}


@torch.no_grad()
def _replica_rows(policy, groups, tokenizer, eval_set: EvalSet, indices: Sequence[int], *, engine, sampling, split,
                  batch_size: int, log) -> list[dict]:
    """Scored rows of ``indices`` on this replica (every rank of it the same)."""
    from megatron_longvideo.data.frames import agree_on_shard_errors, settle_shard_error
    from megatron_longvideo.models.llm import unwrap
    from megatron_longvideo.rl.rollout import RLPrompt, generate_groups, prompt_embeddings

    dataset, rows = eval_set.dataset, []
    positions_of = getattr(unwrap(policy), "rollout_positions", None)  # multimodal RoPE families
    starts = range(0, len(indices), batch_size)
    every = max(1, len(starts) // 10)  # about ten progress lines
    for b, start in enumerate(starts):
        prompts, batch = [], []
        chunk = list(indices[start : start + batch_size])
        samples = [dataset[i] for i in chunk]
        # a slice of a video that failed on one rank of the replica (sharded decoding): all of them agree
        failed = agree_on_shard_errors([s.get("shard_error") for s in samples], groups.tp_cp)
        for i, sample, shard_error in zip(chunk, samples, failed):
            record, row = dataset.records[i], _row(i, dataset.records[i], eval_set.categories[i])
            dataset.skip_report.add_video_errors(sample["bad_inputs"])
            if shard_error is not None:
                settle_shard_error(shard_error, dataset.config.on_error, dataset.skip_report)
            if sample["index"] != i or shard_error is not None:  # skip mode stepped over this record's bad video
                reason = shard_error[1] if shard_error else sample["bad_inputs"][0][1] if sample["bad_inputs"] else "bad video"
                row.update(skipped=reason, prediction=None, extracted=None, correct=False, formatted=False)
                rows.append(row)
                continue
            prompts.append(RLPrompt(videos=tuple(sample["videos"]), prompt_ids=sample["input_ids"],
                                    ground_truth=GroundTruth.from_record(sample["ground_truth"]),
                                    content_ids=tuple(f"{record.problem_id}#{k}" for k in range(len(sample["videos"]))),
                                    sample_id=str(record.problem_id)))
            batch.append(row)
        if not prompts:
            continue
        embeds = prompt_embeddings(policy, groups, prompts)
        positions = positions_of(prompts) if positions_of is not None else None
        tokens = generate_groups(engine, groups, embeds, sampling, positions=positions, split=split)
        for row, prompt, (ids,) in zip(batch, prompts, tokens):
            text = response_text(tokenizer, ids, sampling.stop_token_ids)
            scored = score_prediction(text, prompt.ground_truth)
            row.update(prediction=text, extracted=scored.extracted, correct=scored.correct, formatted=scored.formatted)
            rows.append(row)
        if log is not None and ((b + 1) % every == 0 or b + 1 == len(starts)):
            log(f"[eval] {min(start + batch_size, len(indices))}/{len(indices)} records of this replica")
    return rows


def evaluate(policy, groups, tokenizer, eval_set: EvalSet, *, max_new_tokens: int, engine=None,
             batch_size: Optional[int] = None, max_records: Optional[int] = None,
             log: Optional[Callable[[str], None]] = None) -> EvalResult:
    """Greedy answers of ``policy`` to the records of ``eval_set`` (the first ``max_records``), scored.
    Collective: every rank calls it. ``engine``: a ``megatron`` engine on ``policy`` (built here if None).
    ``batch_size``: prompts per generation call on a replica (default: its CP size, one per CP rank)."""
    from megatron_longvideo.models.llm import unwrap
    from megatron_longvideo.rl.engines import SamplingConfig, build_engine
    from megatron_longvideo.rl.rollout import agree_rollout_split, is_replica_leader

    if engine is None:
        engine = build_engine("megatron", unwrap(policy).cfg, policy=policy, groups=groups, tokenizer=tokenizer,
                              pad_token_id=tokenizer.pad_id)
    split = agree_rollout_split(groups, engine)  # a collective over the replica
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_id,))
    num = len(eval_set.dataset) if max_records is None else min(max_records, len(eval_set.dataset))
    if batch_size is None:
        batch_size = max(1, split.shares)
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if max_records is not None and max_records < 1:
        raise ValueError(f"max_records: must be >= 1 (or None: every record), got {max_records}")
    indices = list(range(groups.dp_rank, num, groups.dp_size))
    rows = _replica_rows(policy, groups, tokenizer, eval_set, indices, engine=engine, sampling=sampling, split=split,
                         batch_size=batch_size, log=log)
    mine = rows if is_replica_leader(groups) else []  # the replica's other ranks hold the same rows
    every = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    gathered = sorted((r for part in every for r in part), key=lambda r: r["index"])
    if [r["index"] for r in gathered] != list(range(num)):
        raise RuntimeError(f"evaluate: gathered rows of records {[r['index'] for r in gathered][:8]}..., "
                           f"expected 0..{num - 1}")
    return EvalResult(rows=gathered, metrics=summarize(gathered))
