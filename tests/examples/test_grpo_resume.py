"""A GRPO run stopped after N steps (``--exit-interval``, as a killed run is after its last save) and resumed
for M more equals the run that never stopped: the per-step
rewards, losses, KL to the reference and learning rates, and the final policy weights. The reference is the
starting weights on both (saved once under ``--save/reference``, recorded in every checkpoint), not the
resumed policy; the learning-rate schedule (warm-up, cosine decay) continues where it was.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import run_ranks
from tests.training.helpers import make_data, run_grpo_example


def varied_reward(inp) -> float:
    """A user reward that differs between different texts, so every group carries a policy gradient."""
    return sum(map(ord, inp.response)) % 89 / 89.0


def _scalars(tb_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _tensors(iter_dir: str, tmp: str) -> dict:
    """Every tensor of a dist checkpoint folder, read with torch's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(tmp, iter_dir.strip(os.sep).replace(os.sep, "_") + ".pt")
    dcp_to_torch_save(iter_dir, out)
    state = torch.load(out, weights_only=False)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix[:-1]] = value

    walk("", state)
    return flat


def _is_weight(key: str) -> bool:
    return not key.startswith(("optimizer", "rng")) and "_extra_state" not in key


def test_a_resumed_grpo_run_equals_the_uninterrupted_one(tmp_path):
    data = make_data(str(tmp_path / "data"), num_videos=4)
    common = ["--video-root", data["video_root"], "--tokenizer", data["tokenizer"], "--data-path", data["qa"],
              "--num-frames", "4", "--max-new-tokens", "8", "--seed", "3", "--group-size", "2", "--prompts-per-step", "2",
              "--kl-beta", "0.2", "--lr", "2e-3", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
              "--min-lr", "1e-4", "--num-minibatches", "2", "--log-samples-every", "0",
              "--reward", f"{__name__}:varied_reward=1.0"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    straight = run_ranks(run_grpo_example, 1, common + ["--train-iters", "4", "--save", str(whole / "ckpt"),
                                                        "--tensorboard-dir", str(whole / "tb")])[0]
    first = run_ranks(run_grpo_example, 1, common + ["--train-iters", "4", "--exit-interval", "2", "--save", str(part / "ckpt"),
                                                     "--tensorboard-dir", str(part / "tb1")])[0]
    second = run_ranks(run_grpo_example, 1, common + ["--train-iters", "4", "--save", str(part / "ckpt"),
                                                      "--tensorboard-dir", str(part / "tb2")])[0]
    assert len(straight) == 4 and len(first) == 2 and len(second) == 2, (straight, first, second)
    assert first + second == straight

    a, b1, b2 = _scalars(str(whole / "tb")), _scalars(str(part / "tb1")), _scalars(str(part / "tb2"))
    for tag in ("train/loss", "train/kl_ref", "train/lr", "reward/mean"):
        resumed = {**b1[tag], **b2[tag]}
        assert set(resumed) == set(a[tag]) == {1, 2, 3, 4}, (tag, a[tag], resumed)
        for step in a[tag]:
            assert resumed[step] == pytest.approx(a[tag][step], rel=1e-6, abs=1e-9), (tag, step, a[tag], resumed)
    lrs = [a["train/lr"][s] for s in (1, 2, 3, 4)]
    assert len(set(lrs)) == 4, lrs  # the schedule moved every step (warm-up, then cosine decay)
    assert a["train/kl_ref"][3] > 1e-6, a["train/kl_ref"]  # the policy moved away from the reference

    # the same final weights, and the same reference (the starting weights), recorded in the checkpoints
    final_a = _tensors(str(whole / "ckpt" / "iter_0000004"), str(tmp_path))
    final_b = _tensors(str(part / "ckpt" / "iter_0000004"), str(tmp_path))
    weights = [k for k in final_a if _is_weight(k)]
    assert weights and set(weights) == {k for k in final_b if _is_weight(k)}
    for k in weights:
        torch.testing.assert_close(final_b[k], final_a[k], rtol=0, atol=0, msg=k)
    ref_a = _tensors(str(whole / "ckpt" / "reference" / "iter_0000000"), str(tmp_path))
    ref_b = _tensors(str(part / "ckpt" / "reference" / "iter_0000000"), str(tmp_path))
    assert {k for k in ref_a if _is_weight(k)} == set(weights)
    for k in weights:
        torch.testing.assert_close(ref_b[k], ref_a[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(ref_a[k], final_a[k]) for k in weights), "the policy trained away from the reference"
    from megatron.core import dist_checkpointing

    recorded = dist_checkpointing.load_common_state_dict(str(part / "ckpt" / "iter_0000004"))["run_config"]
    assert recorded["ref_load"] == str(part / "ckpt" / "reference")
