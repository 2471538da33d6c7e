"""One training stage of the video-language model (projector pretraining or CoT-SFT), from its pieces.

The entry scripts (``examples/pretrain.py``, ``examples/sft.py``) parse flags
(:mod:`megatron_longvideo.training.args`) and call :func:`run_stage`; tests call the builders directly.
A stage is: tokenizer -> model config (vocabulary rounded up to a multiple of TP, the tokenizer's video
placeholder as ``video_token_id``) -> dataset and resumable DP-aware loader -> model with the stage's
frozen parts -> :func:`megatron_longvideo.training.loop.train` with :func:`vlm_loss_step`. The audio family
(Qwen2-Audio) runs SFT the same way, its encoder in the tower's place; it has no caption stage.
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
                      prefetch_factor: int = 2, num_audio_tokens=None, audio=None,
                      probe_dir: str | None = None) -> ResumableDataLoader:
    """The DP-aware resumable loader over ``data_path`` (caption records for pretrain, QA for SFT);
    ``vision``: the media tower's config (:func:`~megatron_longvideo.models.tower_config`);
    ``num_video_tokens`` (frames -> placeholders) defaults to ``vision``'s. ``on_error``: ``raise`` or
    ``skip`` (counted in ``loader.skip_report``). ``decode``: ``full`` or ``sharded`` (each rank of the
    encode group decodes the frames it encodes, in the loader's workers). ``num_audio_tokens``, ``audio``
    (an ``AudioSamplingConfig``) and ``probe_dir``: as :class:`LongVideoDataset` and
    :class:`VideoDatasetConfig` take them (:func:`~megatron_longvideo.training.args.dataset_media` gives
    all four from a model config)."""
    import torch.distributed as dist

    from megatron_longvideo.data.errors import SkipReport
    from megatron_longvideo.models.encode import encode_shard

    if decode not in ("full", "sharded"):
        raise ValueError(f"decode must be 'full' or 'sharded', got {decode!r}")
    config = VideoDatasetConfig(mode=mode, video_root=video_root, sampling=sampling, on_error=on_error,
                                decode="lazy" if decode == "sharded" else "full", probe_dir=probe_dir,
                                **({} if audio is None else {"audio": audio}))
    # every rank reads the whole file: rank 0 alone logs the skipped records (the counts are the same everywhere)
    skips = SkipReport() if not dist.is_initialized() or dist.get_rank() == 0 else SkipReport(log=None)
    dataset = LongVideoDataset.from_file(data_path, tokenizer=tokenizer, skip_report=skips,
                                         num_video_tokens=num_video_tokens or vision.num_video_tokens, config=config,
                                         num_audio_tokens=num_audio_tokens)
    sampler = DistributedVideoSampler(len(dataset), dp_rank=groups.dp_rank, dp_size=groups.dp_size, seed=seed)
    return ResumableDataLoader(dataset, sampler, micro_batch_size=micro_batch_size, num_workers=num_workers,
                               prefetch_factor=prefetch_factor, group=groups.tp_cp,
                               shard=encode_shard(groups, vision) if decode == "sharded" else None)


def build_stage_model(cfg: VLMConfig, groups: ParallelGroups, *, trained: tuple[str, ...], seed: int = 0,
                      recompute_activations: bool = False, **options):
    """The model of this rank with everything but ``trained`` (of llm, vision, projector) frozen.

    ``options``: ``core_attention``, ``attention_kernel``, ``transformer_impl``, ``params_dtype``
    (see :func:`megatron_longvideo.models.llm.build_llm`)."""
    from megatron_longvideo.models import build_model, family_of, replace_tower

    unknown = set(trained) - {"llm", "vision", "projector"}
    if unknown:
        raise ValueError(f"trained: unknown parts {sorted(unknown)}; known: llm, vision, projector (vision: the "
                         "media tower, the audio encoder for qwen2_audio)")
    qwen = family_of(cfg) == "qwen2_5_vl"
    if qwen:  # the merger (its projector) is part of the tower
        cfg = replace_tower(cfg, freeze=not ({"vision", "projector"} & set(trained)))
    else:
        cfg = replace_tower(cfg, freeze="vision" not in trained, freeze_projector="projector" not in trained)
    torch.manual_seed(seed)
    model = build_model(cfg, groups, seed=seed, recompute_activations=recompute_activations, **options)
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
        dataset_media,
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
    if mode == "pretrain" and resolve_family(args) == "qwen2_audio":
        raise ValueError("pretrain: its caption records describe videos, and the qwen2_audio family takes audio: "
                         "train it with examples/sft.py (audio and text records), from scratch or from a converted "
                         "Qwen2-Audio checkpoint (--load CKPT --finetune)")
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
        from megatron_longvideo.models import tower_config

        loader = build_data_loader(mode=mode, data_path=args.data_path, video_root=args.video_root, tokenizer=tokenizer,
                                   sampling=frame_sampling(args), vision=tower_config(cfg), groups=groups,
                                   micro_batch_size=args.micro_batch_size, seed=args.seed, num_workers=args.num_workers,
                                   on_error=args.on_bad_input, decode=args.decode, prefetch_factor=args.prefetch_factor,
                                   **dataset_media(args, cfg))
        step = vlm_loss_step(groups, pad_id=tokenizer.pad_id, seq_length=args.seq_length, pack=args.pack_sequences)
        return train(train_config(args), optim_config(args),
                     model_provider=lambda: build_stage_model(cfg, groups, trained=trained, seed=args.seed,
                                                                  recompute_activations=args.recompute_activations,
                                                                  **model_options(args)),
                     groups=groups, loader=loader, forward_step=step, run_config=run_config(args, stage))
    finally:
        destroy_parallel()


def ensure_synthetic_data(root: str, *, num_videos: int = 64, seed: int = 0, family: str = "llava_onevision") -> dict[str, str]:
    """Write the synthetic dataset under ``root`` once, and a tokenizer with ``family``'s chat tokens once
    per family (rank 0; others wait). The audio family (``qwen2_audio``) gets its own dataset under
    ``root/audio`` (tasks ``audio`` and ``text``: tone questions and text-only sums).

    Returns ``{"qa", "captions", "video_root", "tokenizer"}`` paths.
    """
    import torch.distributed as dist

    from megatron_longvideo.models import special_tokens

    tasks = ("colour",)
    if family == "qwen2_audio":
        root, tasks = os.path.join(root, "audio"), ("audio", "text")

    name = "tokenizer.model" if family == "llava_onevision" else f"tokenizer_{family}.model"  # as make_synthetic_dataset.py
    paths = {"qa": os.path.join(root, "qa.jsonl"), "captions": os.path.join(root, "captions.jsonl"),
             "video_root": os.path.join(root, "videos"), "tokenizer": os.path.join(root, name)}
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0 and not os.path.isfile(paths["tokenizer"]):
        from megatron_longvideo.data import SyntheticDatasetConfig, load_records, make_synthetic_dataset
        from megatron_longvideo.data import train_tokenizer_for_records

        if not os.path.isfile(paths["qa"]):
            make_synthetic_dataset(root, SyntheticDatasetConfig(num_videos=num_videos, min_frames=16, max_frames=48, seed=seed,
                                                                tasks=tasks))
        records = load_records(paths["qa"]).records + load_records(paths["captions"], kind="caption").records
        prefix = paths["tokenizer"][: -len(".model")]
        temp = f"{prefix}.tmp{os.getpid()}"
        train_tokenizer_for_records(records, temp, vocab_size=512, special=special_tokens(family))
        os.replace(temp + ".vocab", prefix + ".vocab")
        os.replace(temp + ".model", paths["tokenizer"])  # last, and whole: the others wait for it
    if dist.is_initialized():
        dist.barrier()
    elif rank != 0:  # ranks before torch.distributed starts (train_grpo.py parses first): wait for rank 0
        import time

        deadline = time.monotonic() + 600.0
        while not os.path.isfile(paths["tokenizer"]):
            if time.monotonic() > deadline:
                raise ValueError(f"--synthetic-data {root}: rank 0 wrote no {paths['tokenizer']} within 600 s")
            time.sleep(0.2)
    return paths
