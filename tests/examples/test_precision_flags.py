"""``--bf16`` / ``--fp16`` in the three entry scripts: each runs and trains a 16-bit model."""

from __future__ import annotations

import os

import torch

from tests.dist import run_ranks
from tests.training.helpers import make_data, run_example


def _grpo(rank, world_size, argv):
    import importlib.util

    from megatron_longvideo.checkpoint.dist_ckpt import close_checkpoint_writer

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                        "train_grpo.py")
    spec = importlib.util.spec_from_file_location("example_train_grpo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = {}
    original = module.build

    def build(args):  # record what the script built
        out = original(args)
        built["dtype"] = str(next(out[3].parameters()).dtype)
        return out

    module.build = build
    try:
        history = module.main(argv)
    finally:
        close_checkpoint_writer()
    return history, built["dtype"]


def test_pretrain_sft_and_grpo_run_in_16_bit(tmp_path):
    data = make_data(str(tmp_path / "data"), num_videos=4)
    common = ["--video-root", data["video_root"], "--tokenizer", data["tokenizer"], "--num-frames", "2",
              "--seed", "3", "--log-interval", "1", "--train-iters", "2", "--lr", "1e-3"]
    out = run_ranks(run_example, 2, "pretrain", common + ["--data-path", data["captions"], "--bf16",
                                                        "--context-parallel-size", "2"])[0]
    assert len(out["losses"]) == 2 and all(v == v for v in out["losses"].values())
    out = run_ranks(run_example, 1, "sft", common + ["--data-path", data["qa"], "--fp16", "--initial-loss-scale", "1024"])[0]
    assert len(out["losses"]) == 2 and all(v == v for v in out["losses"].values())
    history, dtype = run_ranks(_grpo, 2, common + ["--data-path", data["qa"], "--bf16", "--context-parallel-size", "2",
                                                   "--group-size", "2", "--prompts-per-step", "1",
                                                   "--max-new-tokens", "4"])[0]
    assert dtype == str(torch.bfloat16) and len(history) == 2
