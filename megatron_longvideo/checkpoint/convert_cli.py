"""Command line of the Hugging Face converter (``tools/convert_checkpoint.py`` runs :func:`main`).

Megatron -> HF, from a dist checkpoint saved in any TP/PP/CP layout (read back into one process) or
from a full-state file (``save_full_state_file``: a full state and its config)::

    python tools/convert_checkpoint.py to-hf --dist-checkpoint ckpt/sft --out hf_model --tokenizer tok.model
    python tools/convert_checkpoint.py to-hf --full-state policy.pt --out hf_model \
        --max-shard-size 2GB --dtype bfloat16 --tokenizer tokenizer_dir

HF -> Megatron full state (then ``load_full_state`` into any TP/PP layout)::

    python tools/convert_checkpoint.py from-hf --hf llava-onevision-qwen2-7b-ov-hf --out init.pt

From a running job, call :func:`~megatron_longvideo.checkpoint.hf_convert.export_model` (any layout)
instead.
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
    to_hf = sub.add_parser("to-hf", help="Megatron full state -> HF folder (Qwen2 / LLaVA-OneVision)")
    source = to_hf.add_mutually_exclusive_group(required=True)
    source.add_argument("--full-state", help="file written by save_full_state_file")
    source.add_argument("--dist-checkpoint", help="a dist checkpoint folder or save root (its latest complete checkpoint)")
    to_hf.add_argument("--out", required=True, help="output folder")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MiB (default 5GB)")
    to_hf.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast floating tensors (default: keep)")
    to_hf.add_argument("--tokenizer", default=None, help="tokenizer folder or sentencepiece .model file to copy")
    to_hf.add_argument("--no-progress", action="store_true", help="no progress bar")
    from_hf = sub.add_parser("from-hf", help="HF folder -> Megatron full-state file")
    from_hf.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
    from_hf.add_argument("--out", required=True, help="output full-state file")
    from_hf.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def full_state_from_dist_checkpoint(path: str):
    """``(config, full state)`` of a dist checkpoint, whatever layout saved it: the model is rebuilt
    from the recorded config on one process (CPU mode where CUDA is absent) and the checkpoint is
    resharded into it. Memory: the whole model once."""
    import os
    import socket

    import torch.distributed as dist

    from megatron_longvideo.checkpoint.dist_ckpt import load_checkpoint, model_config_of
    from megatron_longvideo.checkpoint.full_state import gather_full_state
    from megatron_longvideo.models.vlm import build_vlm
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.platform import enable_cpu_mode

    cfg = model_config_of(path)
    cpu = enable_cpu_mode()
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo" if cpu else "nccl")
    groups = initialize_parallel(ParallelConfig())
    try:
        model = build_vlm(cfg, groups)
        load_checkpoint(path, model=model, groups=groups, weights_only=True)
        return cfg, gather_full_state(model, groups)
    finally:
        destroy_parallel()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_longvideo.checkpoint.hf_convert import load_full_state_file, load_hf, save_full_state_file, save_hf

    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-hf":
            if args.dist_checkpoint:
                cfg, state = full_state_from_dist_checkpoint(args.dist_checkpoint)
            else:
                cfg, state = load_full_state_file(args.full_state)
            files = save_hf(state, cfg, args.out, max_shard_size=args.max_shard_size,
                            dtype=_DTYPES.get(args.dtype) if args.dtype else None,
                            tokenizer=args.tokenizer, progress=not args.no_progress)
            print(f"wrote {len(files)} files to {args.out}")
        else:
            checkpoint = load_hf(args.hf, progress=not args.no_progress)
            save_full_state_file(args.out, checkpoint.config, checkpoint.state)
            print(f"wrote {len(checkpoint.state)} tensors to {args.out}")
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0
