"""Evaluate a checkpoint (or a Hugging Face folder) on a LongVideo-Reason-style test file.

What it does: loads the model (a megatron dist checkpoint with ``--load``, its shape with
``--use-checkpoint-args``; or a Hugging Face LLaVA-OneVision / Qwen2.5-VL folder with ``--hf``), answers
every question greedily with the policy itself (the ``megatron`` engine: no weight copy, TP-sharded),
and scores the answers with the GRPO rewards' rules (:mod:`megatron_longvideo.rl.evaluation`). Data
parallel ranks split the records; the ranks of a replica encode each video together (MR-SP parallel
encoding, the encode group) and split a batch's decoding over CP. Writes under ``--out``:

* ``metrics.json``: per-category and overall accuracy, format rate and counts;
* ``predictions.jsonl``: one line per record (id, category, answer, prediction, extracted, correct, formatted).

The category of a record is its ``--category-field`` (default ``problem_type``, where the public test split
keeps temporal / goal / plot / spatial); ``all`` without it. What it leaves out: pipeline parallelism,
sampling (greedy only), multi-video records.

CPU (the synthetic data; one rank, then 2 ranks at CP=2, which give the same predictions):

    torchrun --nproc-per-node 1 examples/evaluate.py --load demo_out/ckpt --use-checkpoint-args --data-path demo_out/data/qa.jsonl \\
        --video-root demo_out/data/videos --tokenizer demo_out/data/tokenizer.model --out demo_out/eval
    torchrun --nproc-per-node 2 examples/evaluate.py --context-parallel-size 2 ... (the same flags)

One GPU node, a Hugging Face folder, 512 frames, 8 ranks (DP=2 x CP=4):

    torchrun --nproc-per-node 8 examples/evaluate.py --hf LLaVA-OneVision-7B --context-parallel-size 4 --bf16 \\
        --data-path longvideo_reason_test.jsonl --video-root longvideo_eval_videos --num-frames 512 \\
        --max-new-tokens 1024 --out eval_out
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_eval_args(parser):
    g = parser.add_argument_group("evaluation")
    g.add_argument("--hf", default=None, metavar="DIR",
                   help="evaluate a Hugging Face folder (its config.json gives the shape; its tokenizer is the default)")
    g.add_argument("--out", default=None, metavar="DIR", help="where metrics.json and predictions.jsonl go")
    g.add_argument("--max-new-tokens", type=int, default=256, help="longest answer generated per record")
    g.add_argument("--max-records", type=int, default=None, help="evaluate the first N records only")
    g.add_argument("--batch-size", type=int, default=None,
                   help="prompts per generation call on each data-parallel replica (default: the CP size)")
    g.add_argument("--category-field", default="problem_type",
                   help="record field that names the category (a record without it is in 'all')")


def parse_args(argv=None):
    from megatron_longvideo.training.args import parse, resolve_tokenizer

    # --on-bad-input skip: a bad record is dropped, a bad video's record counted as skipped (in no accuracy)
    args = parse(argv, description="Evaluate a long-video VLM on a LongVideo-Reason-style test file",
                 extend=add_eval_args, defaults={"on_bad_input": "raise"})
    if args.hf:
        if args.load or args.use_checkpoint_args or args.hf_config not in (None, args.hf):
            raise SystemExit("evaluate.py: --hf names the model; leave out --load, --use-checkpoint-args and --hf-config")
        args.hf_config = args.hf
        if not args.tokenizer:  # the folder's own: a Hugging Face tokenizer, else a sentencepiece tokenizer.model
            from megatron_longvideo.checkpoint.hf_io import is_hf_tokenizer_folder

            spm = os.path.join(args.hf, "tokenizer.model")
            args.tokenizer = args.hf if is_hf_tokenizer_folder(args.hf) else spm if os.path.isfile(spm) else None
    elif not args.load:
        raise SystemExit("evaluate.py: give --load CKPT (with --use-checkpoint-args for its shape) or --hf DIR")
    resolve_tokenizer(args)
    for flag in ("data_path", "video_root", "tokenizer"):
        if not getattr(args, flag):
            raise SystemExit(f"evaluate.py: --{flag.replace('_', '-')} is required")
    if args.pipeline_model_parallel_size != 1:
        raise SystemExit("evaluate.py: --pipeline-model-parallel-size must be 1 (the megatron engine needs whole layers)")
    from megatron_longvideo.training.args import validate_inputs

    validate_inputs(args)
    if args.hf and not os.path.isfile(os.path.join(args.hf, "config.json")):
        raise SystemExit(f"evaluate.py: --hf {args.hf}: no config.json there; expected a Hugging Face model folder")
    return args


def load_model(args, cfg, groups):
    """This rank's model with the weights of ``--load`` or ``--hf``."""
    from megatron_longvideo.models import build_model
    from megatron_longvideo.training.args import model_options
    from megatron_longvideo.training.engine import mixed_precision

    torch.manual_seed(args.seed)
    model = mixed_precision(build_model(cfg, groups, seed=args.seed, **model_options(args)))
    if args.hf:
        from megatron_longvideo.checkpoint.hf_convert import load_hf_into_model

        load_hf_into_model(model, groups, args.hf)
    else:
        from megatron_longvideo.checkpoint.dist_ckpt import load_checkpoint

        load_checkpoint(args.load, model=model, groups=groups, weights_only=True,
                        verify_checksums=not args.no_verify_checksums)
    model.requires_grad_(False)
    return model


def write_outputs(out_dir: str, result, *, args) -> None:
    """``metrics.json`` and ``predictions.jsonl`` under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    metrics = dict(result.metrics, data_path=args.data_path, model=args.hf or args.load,
                   max_new_tokens=args.max_new_tokens, num_frames=None if args.fps else args.num_frames, fps=args.fps)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None):
    args = parse_args(argv)
    import torch.distributed as dist

    from megatron_longvideo.data.errors import SkipReport
    from megatron_longvideo.models import tower_config
    from megatron_longvideo.parallel.groups import destroy_parallel, initialize_parallel
    from megatron_longvideo.platform import enable_cpu_mode
    from megatron_longvideo.models.encode import encode_shard
    from megatron_longvideo.rl.evaluation import build_eval_set, evaluate, format_table
    from megatron_longvideo.training.args import (dataset_media, frame_sampling, load_tokenizer_for, model_config,
                                                  parallel_config)

    enable_cpu_mode()
    groups = initialize_parallel(parallel_config(args), seed=args.seed)
    try:
        rank0 = dist.get_rank() == 0
        log = print if rank0 else None
        tok = load_tokenizer_for(args)
        cfg = model_config(args, tok)
        model = load_model(args, cfg, groups)
        skips = SkipReport() if rank0 else SkipReport(log=None)
        eval_set = build_eval_set(args.data_path, tokenizer=tok, video_root=args.video_root, sampling=frame_sampling(args),
                                  category_field=args.category_field, on_error=args.on_bad_input, skip_report=skips,
                                  decode=args.decode, shard=encode_shard(groups, tower_config(cfg)),
                                  **dataset_media(args, cfg))
        result = evaluate(model, groups, tok, eval_set, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          max_records=args.max_records, log=log)
        if rank0:
            if skips.total:
                print(skips.summary())
            print(format_table(result.metrics))
            if args.out:
                write_outputs(args.out, result, args=args)
                print(f"wrote {os.path.join(args.out, 'metrics.json')} and predictions.jsonl")
        return result
    finally:
        destroy_parallel()


if __name__ == "__main__":
    from megatron_longvideo.training.launch import run_script  # one error line per run; tracebacks in logs/

    sys.exit(run_script(main, name="evaluate"))
