"""Shared by the loop, checkpoint and example tests: a tiny SFT run on real synthetic videos.

``make_data`` runs in the pytest process (videos, records, tokenizer); the rest runs inside spawned ranks.
"""

from __future__ import annotations

import os

import torch

NUM_FRAMES = 4


def make_data(root: str, num_videos: int = 8, family: str = "llava_onevision") -> dict:
    """Synthetic videos (16-24 frames), their QA / caption records and a tokenizer with ``family``'s chat
    tokens, under ``root``."""
    from megatron_longvideo.data import SyntheticDatasetConfig, load_records, make_synthetic_dataset
    from megatron_longvideo.data import train_tokenizer_for_records
    from megatron_longvideo.models import special_tokens

    ds = make_synthetic_dataset(root, SyntheticDatasetConfig(num_videos=num_videos, min_frames=16, max_frames=24, seed=5))
    records = load_records(ds.qa_path).records + load_records(ds.caption_path, kind="caption").records
    tokenizer = train_tokenizer_for_records(records, os.path.join(root, "tokenizer"), vocab_size=400,
                                            special=special_tokens(family))
    return {"qa": ds.qa_path, "captions": ds.caption_path, "video_root": ds.video_root, "tokenizer": tokenizer}


def layout_config(layout: dict):
    from megatron_longvideo.parallel.groups import ParallelConfig

    return ParallelConfig(tensor_parallel_size=layout.get("tp", 1), pipeline_parallel_size=layout.get("pp", 1),
                          context_parallel_size=layout.get("cp", 1), sequence_parallel=layout.get("sp", False))


class Run:
    """The pieces of one SFT run at ``layout`` (initialises megatron's parallel state; call ``close``)."""

    def __init__(self, layout: dict, data: dict, *, seed: int = 0, micro_batch_size: int = 1, hidden_size: int = 32):
        from megatron_longvideo.data import FrameSamplingConfig, load_tokenizer
        from megatron_longvideo.models.llm import LLMConfig
        from megatron_longvideo.models.llava_onevision.vision import VisionConfig
        from megatron_longvideo.parallel.groups import initialize_parallel
        from megatron_longvideo.training.stage import build_data_loader, vlm_config_for
        from megatron_longvideo.training.vlm_step import vlm_loss_step

        self.groups = initialize_parallel(layout_config(layout), seed=seed)
        self.tokenizer = load_tokenizer(data["tokenizer"])
        vision = VisionConfig(hidden_size=16, num_layers=1, num_attention_heads=2, ffn_hidden_size=32)
        llm = LLMConfig(hidden_size=hidden_size, num_layers=2, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=2 * hidden_size)
        self.cfg = vlm_config_for(self.tokenizer, llm=llm, vision=vision,
                                  tensor_parallel_size=self.groups.tp_size)
        self.sampling = FrameSamplingConfig(num_frames=NUM_FRAMES, image_size=vision.image_size)
        self.loader = build_data_loader(mode="sft", data_path=data["qa"], video_root=data["video_root"],
                                        tokenizer=self.tokenizer, sampling=self.sampling, vision=vision,
                                        groups=self.groups, micro_batch_size=micro_batch_size, seed=seed)
        self.step = vlm_loss_step(self.groups, pad_id=self.tokenizer.pad_id)
        self.seed = seed

    def model(self):
        from megatron_longvideo.training.stage import build_stage_model

        return build_stage_model(self.cfg, self.groups, trained=("llm", "projector"), seed=self.seed)

    def train(self, optim, **train_kwargs):
        from megatron_longvideo.training.loop import TrainConfig, train

        return train(TrainConfig(**train_kwargs), optim, model_provider=self.model, groups=self.groups,
                     loader=self.loader, forward_step=self.step, run_config={"test": True})

    def fixed_batch(self, index: int = 0) -> dict:
        """One collated micro-batch of sample ``index``, the same on every rank."""
        dataset = self.loader.dataset
        return self.loader.collate_fn([dataset[index]])

    def close(self):
        from megatron_longvideo.parallel.groups import destroy_parallel

        destroy_parallel()


def eval_loss(model, run: Run, batch: dict) -> float:
    """Mean per-token loss of ``batch`` (forward only), the same number on every rank."""
    from megatron_longvideo.training.engine import forward_backward
    from megatron_longvideo.training.loop import _reduce_loss

    with torch.no_grad():
        reports = forward_backward(model, run.step, [batch], seq_length=0, micro_batch_size=1, forward_only=True)
    loss, _ = _reduce_loss(reports, run.groups)
    return loss


def train_step(model, optimizer, run: Run, batch: dict) -> float:
    """One optimizer step on ``batch`` (every DP rank the same batch: the world=1 gradient)."""
    from megatron_longvideo.training.engine import forward_backward
    from megatron_longvideo.training.loop import _reduce_loss

    model.zero_grad_buffer()
    optimizer.zero_grad()
    reports = forward_backward(model, run.step, [batch], seq_length=0, micro_batch_size=1)
    optimizer.step()
    return _reduce_loss(reports, run.groups)[0]


def full_weights(model, run: Run) -> dict:
    from megatron_longvideo.checkpoint.full_state import gather_full_state

    return gather_full_state(model, run.groups)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run_example(rank, world_size, script: str, argv: list) -> dict:
    """Spawned rank: ``examples/<script>.py``'s ``main(argv)``; returns its per-step losses."""
    import importlib.util

    from megatron_longvideo.checkpoint.dist_ckpt import close_checkpoint_writer

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                        f"{script}.py")
    spec = importlib.util.spec_from_file_location(f"example_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        result = module.main(argv)
    finally:
        close_checkpoint_writer()
    return {"losses": result.losses, "skipped": result.skipped, "start": result.start_step}


def run_grpo_example(rank, world_size, argv: list) -> list:
    """Spawned rank: ``examples/train_grpo.py``'s ``main(argv)``; returns its per-step mean rewards."""
    import importlib.util

    from megatron_longvideo.checkpoint.dist_ckpt import close_checkpoint_writer

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                        "train_grpo.py")
    spec = importlib.util.spec_from_file_location("example_train_grpo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.main(argv)
    finally:
        close_checkpoint_writer()
