"""Command line of the Hugging Face converter (``tools/convert_checkpoint.py`` runs :func:`main`).

HF -> a dist checkpoint that ``pretrain.py``, ``sft.py`` and ``train_grpo.py`` take with ``--load``
(resharded to the run's TP / PP / CP when it loads; the tokenizer and chat template come along)::

    python tools/convert_checkpoint.py from-hf --hf llava-onevision-qwen2-7b-ov-hf --out ckpt/init
    torchrun --nproc-per-node 4 tools/convert_checkpoint.py from-hf --hf HF_DIR --out ckpt/init \
        --pipeline-model-parallel-size 4        # the model split over 4 processes: a quarter each

Megatron -> HF, from a dist checkpoint saved in any TP/PP/CP layout (read back into one process) or
from a full-state file (``save_full_state_file``)::

    python tools/convert_checkpoint.py to-hf --dist-checkpoint ckpt/grpo --out hf_model
    python tools/convert_checkpoint.py to-hf --dist-checkpoint ckpt/grpo --out hf_llm --llm-only
    python tools/convert_checkpoint.py to-hf --full-state policy.pt --out hf_model --tokenizer tok_dir

The HF folder holds ``config.json``, safetensors shards, the tokenizer, ``generation_config.json``, a chat
template and (for a VLM or a Qwen2-Audio) the family's processor configs. Families: Qwen2, LLaVA-OneVision,
Qwen2.5-VL and Qwen2-Audio (``--llm-only``: LLaVA-OneVision and Qwen2-Audio). From a running job, call
:func:`~megatron_longvideo.checkpoint.hf_convert.export_model` (any layout) instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

__all__ = ["main", "build_parser", "full_state_from_dist_checkpoint"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint", description="Megatron <-> Hugging Face checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf",
                           help="Megatron checkpoint -> HF folder (Qwen2, LLaVA-OneVision, Qwen2.5-VL, Qwen2-Audio)")
    source = to_hf.add_mutually_exclusive_group(required=True)
    source.add_argument("--dist-checkpoint", help="a dist checkpoint folder or save root (its latest complete checkpoint)")
    source.add_argument("--full-state", help="file written by save_full_state_file")
    to_hf.add_argument("--out", required=True, help="output folder")
    to_hf.add_argument("--llm-only", action="store_true", help="write the language model alone as Qwen2ForCausalLM")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MiB (default 5GB)")
    to_hf.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                       help="cast floating tensors (default: the dtype the checkpoint holds)")
    to_hf.add_argument("--tokenizer", default=None,
                       help="tokenizer folder or sentencepiece .model file (default: the checkpoint's, or its run's)")
    to_hf.add_argument("--no-progress", action="store_true", help="no progress bar")
    from_hf = sub.add_parser("from-hf", help="HF folder -> Megatron dist checkpoint (or full-state file)")
    from_hf.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
    from_hf.add_argument("--out", required=True, help="checkpoint root to write (a full-state file with --format full-state)")
    from_hf.add_argument("--format", choices=("dist", "full-state"), default="dist",
                         help="dist: a checkpoint the entry scripts --load; full-state: one torch.save file for load_full_state")
    from_hf.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="weights dtype (default: the checkpoint's)")
    from_hf.add_argument("--tokenizer", default=None, help="tokenizer folder to carry along when --hf has none")
    from_hf.add_argument("--tensor-model-parallel-size", type=int, default=1,
                         help="split the conversion over processes (under torchrun): memory per process shrinks")
    from_hf.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    from_hf.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _from_hf(args) -> str:
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.hf_checkpoint import ensure_process_group, import_hf_checkpoint
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    ensure_process_group()
    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=args.tensor_model_parallel_size,
                                                pipeline_parallel_size=args.pipeline_model_parallel_size))
    try:
        return import_hf_checkpoint(args.hf, args.out, groups=groups, dtype=_DTYPES.get(args.dtype) if args.dtype else None,
                                    tokenizer=args.tokenizer, progress=not args.no_progress and dist.get_rank() == 0)
    finally:
        destroy_parallel()


def full_state_from_dist_checkpoint(path: str):
    """``(config, full state)`` of a dist checkpoint, whatever layout saved it, read on one process."""
    from megatron_longvideo.checkpoint.full_state import gather_full_state
    from megatron_longvideo.checkpoint.hf_checkpoint import load_on_one_process

    with load_on_one_process(path) as (cfg, model, _, _, groups):
        return cfg, gather_full_state(model, groups)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_longvideo.checkpoint.dist_ckpt import CheckpointError
    from megatron_longvideo.checkpoint.hf_checkpoint import export_dist_checkpoint
    from megatron_longvideo.checkpoint.hf_convert import load_full_state_file, load_hf, save_full_state_file, save_hf

    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-hf":
            dtype = _DTYPES.get(args.dtype) if args.dtype else None
            part = "language_model" if args.llm_only else "all"
            if args.dist_checkpoint:
                files = export_dist_checkpoint(args.dist_checkpoint, args.out, part=part, dtype=dtype,
                                               tokenizer=args.tokenizer, max_shard_size=args.max_shard_size,
                                               progress=not args.no_progress)
            else:
                cfg, state = load_full_state_file(args.full_state)
                files = save_hf(state, cfg, args.out, part=part, max_shard_size=args.max_shard_size, dtype=dtype,
                                tokenizer=args.tokenizer, progress=not args.no_progress)
            print(f"wrote {len(files)} files to {args.out}")
        elif args.format == "full-state":
            checkpoint = load_hf(args.hf, progress=not args.no_progress)
            save_full_state_file(args.out, checkpoint.config, checkpoint.state)
            print(f"wrote {len(checkpoint.state)} tensors to {args.out}")
        else:
            import torch.distributed as dist

            path = _from_hf(args)
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"wrote {path}: start a run from it with --load {args.out} --use-checkpoint-args")
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, CheckpointError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0
