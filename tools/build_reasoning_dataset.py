"""Turn clip captions into question-reasoning-answer records with any OpenAI-compatible chat model.

Reads a captions JSONL (``videos``, ``caption``, ``id``: what ``make_synthetic_dataset.py`` writes as
``captions.jsonl``), asks the model for multiple-choice questions with options A-D, a reasoning string
and the answer letter, validates each reply against the question-record schema and appends the records
to ``--out`` (loadable with ``load_records(path, kind="qa")``). Rerunning with the same ``--out``
resumes: records already there are kept and not asked for again. Leaves out: the video itself (the model
sees only the caption), free-form and numerical questions.

    python tools/build_reasoning_dataset.py --captions /tmp/synth/captions.jsonl --out /tmp/synth/reasoning.jsonl \\
        --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct
    OPENAI_API_KEY=... python tools/build_reasoning_dataset.py --captions captions.jsonl --out qa.jsonl \\
        --base-url https://api.openai.com/v1 --model gpt-4o-mini --questions-per-clip 3 --workers 4

Exit status 0 when the run finishes (skipped questions are counted in the summary), 2 on a bad flag or
an unreadable captions / output file. See ``megatron_longvideo/data/builder.py`` for the details.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from megatron_longvideo.data.builder import BuildConfig, ChatEndpoint, build_dataset

PROG = "build_reasoning_dataset"
_FLAGS = {"base_url": "--base-url", "model": "--model", "timeout": "--timeout", "temperature": "--temperature",
          "questions_per_clip": "--questions-per-clip", "max_retries": "--max-retries", "backoff_s": "--backoff",
          "limit": "--limit", "workers": "--workers"}
"""Config fields whose errors name the flag that set them."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", required=True, help="captions JSONL (or JSON list) with videos, caption and id")
    p.add_argument("--out", required=True, help="question JSONL to append to (created if missing; resumed if not)")
    p.add_argument("--base-url", default=None,
                   help="OpenAI-compatible API root, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL)")
    p.add_argument("--model", required=True, help="model name sent with each request")
    p.add_argument("--api-key", default=None,
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY; none if unset); never printed")
    p.add_argument("--questions-per-clip", type=int, default=1,
                   help="questions per caption; later ones are asked to differ from the earlier (default 1)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the connection and for each read of a reply (default 60)")
    p.add_argument("--max-retries", type=int, default=3,
                   help="re-asks per question after HTTP 429/5xx, a timeout, a connection error or a malformed "
                        "or invalid reply; then the question is skipped and counted (default 3)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="first wait in seconds before re-asking after an HTTP or network error; doubles each "
                        "time, with jitter, at most 30 s (default 1)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N captions of the file")
    p.add_argument("--workers", type=int, default=1,
                   help="captions asked about at once; the output order stays the captions' order (default 1)")
    return p


def main(argv: list[str] | None = None, *, sleep=time.sleep) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        p.error("--base-url is required (or set OPENAI_BASE_URL)")
    api_key = args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY")
    try:
        endpoint = ChatEndpoint(base_url=base_url, model=args.model, api_key=api_key or None,
                                timeout_s=args.timeout, temperature=args.temperature)
        config = BuildConfig(questions_per_clip=args.questions_per_clip, max_retries=args.max_retries,
                             backoff_s=args.backoff, limit=args.limit, workers=args.workers)
    except ValueError as e:
        p.error(re.sub(r"^\w+", lambda m: _FLAGS.get(m.group(0), m.group(0)), str(e)))
    if not os.path.isfile(args.captions):
        print(f"{PROG}: error: {args.captions}: captions file not found", file=sys.stderr)
        return 2
    try:
        summary = build_dataset(args.captions, args.out, endpoint, config, sleep=sleep,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    except (OSError, ValueError) as e:  # unreadable captions or output (RecordError is a ValueError)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(summary.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
