"""One training stage of the video-language model (projector pretraining or CoT-SFT), from its pieces.

The entry scripts (``examples/pretrain.py``, ``examples/sft.py``) parse flags
(:mod:`megatron_longvideo.training.args`) and call :func:`run_stage`; tests call the builders directly.
A stage is: tokenizer -> model config (vocabulary rounded up to a multiple of TP, the tokenizer's video
placeholder as ``video_token_id``) -> dataset and resumable DP-aware loader -> model with the stage's
frozen parts -> :func:`megatron_longvideo.training.loop.train` with :func:`vlm_loss_step`.
"""

from __future__ import annotations

import os

import torch

from megatron_longvideo.data import (
    DistributedVideoSampler,
    FrameSamplingConfig,
    LongVideoDataset,
    ResumableDataLoader,
    VideoDatasetConfig,
)
from megatron_longvideo.models.llm import LLMConfig
from megatron_longvideo.models.llava_onevision.vision import VisionConfig
from megatron_longvideo.models.llava_onevision.model import VLMConfig
from megatron_longvideo.parallel.groups import ParallelGroups

__all__ = ["STAGES", "vlm_config_for", "build_data_loader", "build_stage_model", "run_stage"]

STAGES = {
    # stage: (dataset mode, trained parts)
    "pretrain": ("pretrain", ("projector",)),
    "sft": ("sft", ("llm", "projector")),
}


def vlm_config_for(tokenizer, *, llm: LLMConfig, vision: VisionConfig, tensor_parallel_size: int) -> VLMConfig:
    """The model config for ``tokenizer``: its vocabulary (rounded up to a multiple of TP) and video id."""
    import dataclasses

    tp = tensor_parallel_size
    vocab = -(-tokenizer.vocab_size // tp) * tp
    return VLMConfig(llm=dataclasses.replace(llm, vocab_size=vocab), vision=vision, video_token_id=tokenizer.video_id)


def build_data_loader(*, mode: str, data_path: str, video_root: str, tokenizer, sampling: FrameSamplingConfig,
                      vision: VisionConfig, groups: ParallelGroups, micro_batch_size: int, seed: int = 0,
                      num_workers: int = 0, num_video_tokens=None, on_error: str = "raise", decode: str = "full",
                      prefetch_factor: int = 2) -> ResumableDataLoader:
    """The DP-aware resumable loader over ``data_path`` (caption records for pretrain, QA for SFT);
    ``num_video_tokens`` (frames -> placeholders) defaults to ``vision``'s. ``on_error``: ``raise`` or
    ``skip`` (counted in ``loader.skip_report``). ``decode``: ``full`` or ``sharded`` (each rank of the
    encode group decodes the frames it encodes, in the loader's workers)."""
    import torch.distributed as dist

    from megatron_longvideo.data.errors import SkipReport
    from megatron_longvideo.models.encode import encode_shard

    if decode not in ("full", "sharded"):
        raise ValueError(f"decode must be 'full' or 'sharded', got {decode!r}")
    config = VideoDatasetConfig(mode=mode, video_root=video_root, sampling=sampling, on_error=on_error,
                                decode="lazy" if decode == "sharded" else "full")
    # every rank reads the whole file: rank 0 alone logs the skipped records (the counts are the same everywhere)
    skips = SkipReport() if not dist.is_initialized() or dist.get_rank() == 0 else SkipReport(log=None)
    dataset = LongVideoDataset.from_file(data_path, tokenizer=tokenizer, skip_report=skips,
                                         num_video_tokens=num_video_tokens or vision.num_video_tokens, config=config)
    sampler = DistributedVideoSampler(len(dataset), dp_rank=groups.dp_rank, dp_size=groups.dp_size, seed=seed)
    return ResumableDataLoader(dataset, sampler, micro_batch_size=micro_batch_size, num_workers=num_workers,
                               prefetch_factor=prefetch_factor, group=groups.tp_cp,
                               shard=encode_shard(groups, vision) if decode == "sharded" else None)


def build_stage_model(cfg: VLMConfig, groups: ParallelGroups, *, trained: tuple[str, ...], seed: int = 0,
                      recompute_activations: bool = False, **options):
    """The model of this rank with everything but ``trained`` (of llm, vision, projector) frozen.

    ``options``: ``core_attention``, ``attention_kernel``, ``transformer_impl``, ``params_dtype``
    (see :func:`megatron_longvideo.models.llm.build_llm`)."""
    import dataclasses

    from megatron_longvideo.models import build_model, family_of

    unknown = set(trained) - {"llm", "vision", "projector"}
    if unknown:
        raise ValueError(f"trained: unknown parts {sorted(unknown)}; known: llm, vision, projector")
    qwen = family_of(cfg) == "qwen2_5_vl"
    if qwen:  # the merger (its projector) is part of the tower
        vision = dataclasses.replace(cfg.vision, freeze=not ({"vision", "projector"} & set(trained)))
    else:
        vision = dataclasses.replace(cfg.vision, freeze="vision" not in trained, freeze_projector="projector" not in trained)
    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(cfg, vision=vision), groups, seed=seed, recompute_activations=recompute_activations,
                        **options)
    if qwen and "projector" in trained and "vision" not in trained and model.vision is not None:
        for name, p in model.vision.named_parameters():
            p.requires_grad_(name.startswith(("merger.", "merger_norm.")))
    if "llm" not in trained:
        model.llm.requires_grad_(False)
    return model


def run_stage(stage: str, args):
    """Run ``stage`` ("pretrain" or "sft") from parsed flags (:func:`megatron_longvideo.training.args.parse`)."""
    from megatron_longvideo.parallel.groups import destroy_parallel, initialize_parallel
    from megatron_longvideo.platform import enable_cpu_mode
    from megatron_longvideo.training.args import (
        model_options,
        frame_sampling,
        load_tokenizer_for,
        resolve_family,
        model_config,
        optim_config,
        parallel_config,
        resolve_tokenizer,
        run_config,
        train_config,
        validate_inputs,
    )
    from megatron_longvideo.training.loop import train
    from megatron_longvideo.training.vlm_step import vlm_loss_step

    mode, trained = STAGES[stage]
    if getattr(args, "train_vision_tower", False):
        trained = trained + ("vision",)
    enable_cpu_mode()
    parallel = parallel_config(args)
    groups = initialize_parallel(parallel, seed=args.seed)
    try:
        if args.synthetic_data:
            paths = ensure_synthetic_data(args.synthetic_data, seed=args.seed, family=resolve_family(args))
            args.data_path = args.data_path or paths["captions" if mode == "pretrain" else "qa"]
            args.video_root = args.video_root or paths["video_root"]
            args.tokenizer = args.tokenizer or paths["tokenizer"]
        resolve_tokenizer(args)
        for flag in ("data_path", "video_root", "tokenizer"):
            if not getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} is required (or --synthetic-data DIR)")
        validate_inputs(args)
        tokenizer = load_tokenizer_for(args)
        cfg = model_config(args, tokenizer)
        from megatron_longvideo.models import video_token_counter

        loader = build_data_loader(mode=mode, data_path=args.data_path, video_root=args.video_root, tokenizer=tokenizer,
                                   sampling=frame_sampling(args), vision=cfg.vision, groups=groups,
                                   micro_batch_size=args.micro_batch_size, seed=args.seed, num_workers=args.num_workers,
                                   num_video_tokens=video_token_counter(cfg, args.image_size), on_error=args.on_bad_input,
                                   decode=args.decode, prefetch_factor=args.prefetch_factor)
        step = vlm_loss_step(groups, pad_id=tokenizer.pad_id, seq_length=args.seq_length)
        return train(train_config(args), optim_config(args),
                     model_provider=lambda: build_stage_model(cfg, groups, trained=trained, seed=args.seed,
                                                                  recompute_activations=args.recompute_activations,
                                                                  **model_options(args)),
                     groups=groups, loader=loader, forward_step=step, run_config=run_config(args, stage))
    finally:
        destroy_parallel()


def ensure_synthetic_data(root: str, *, num_videos: int = 64, seed: int = 0, family: str = "llava_onevision") -> dict[str, str]:
    """Write the synthetic dataset under ``root`` once, and a tokenizer with ``family``'s chat tokens once
    per family (rank 0; others wait).

    Returns ``{"qa", "captions", "video_root", "tokenizer"}`` paths.
    """
    import torch.distributed as dist

    from megatron_longvideo.models import special_tokens

    name = "tokenizer.model" if family == "llava_onevision" else f"tokenizer_{family}.model"  # as make_synthetic_dataset.py
    paths = {"qa": os.path.join(root, "qa.jsonl"), "captions": os.path.join(root, "captions.jsonl"),
             "video_root": os.path.join(root, "videos"), "tokenizer": os.path.join(root, name)}
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0 and not os.path.isfile(paths["tokenizer"]):
        from megatron_longvideo.data import SyntheticDatasetConfig, load_records, make_synthetic_dataset
        from megatron_longvideo.data import train_tokenizer_for_records

        if not os.path.isfile(paths["qa"]):
            make_synthetic_dataset(root, SyntheticDatasetConfig(num_videos=num_videos, min_frames=16, max_frames=48, seed=seed))
        records = load_records(paths["qa"]).records + load_records(paths["captions"], kind="caption").records
        train_tokenizer_for_records(records, paths["tokenizer"][: -len(".model")], vocab_size=512,
                                    special=special_tokens(family))
    if dist.is_initialized():
        dist.barrier()
    return paths
