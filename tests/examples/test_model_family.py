"""The three entry scripts with ``--model-family qwen2_5_vl`` on the synthetic videos, 2 ranks at CP=2:
projector (merger) pretraining, CoT-SFT from it with ``--finetune``, then GRPO from the SFT weights with
``--use-checkpoint-args`` (the Qwen2.5-VL shape read back from the checkpoint)."""

from __future__ import annotations

from tests.dist import run_ranks
from tests.training.helpers import make_data, run_example, run_grpo_example


def test_qwen25vl_family_through_pretrain_sft_and_grpo(tmp_path):
    from megatron_longvideo.checkpoint.dist_ckpt import find_checkpoint, model_config_of
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig

    data = make_data(str(tmp_path / "data"), num_videos=4)
    common = ["--model-family", "qwen2_5_vl", "--context-parallel-size", "2", "--video-root", data["video_root"],
              "--tokenizer", data["tokenizer"], "--num-frames", "3", "--seed", "3"]
    out = run_ranks(run_example, 2, "pretrain", common + ["--data-path", data["captions"], "--train-iters", "2",
                                                          "--save", str(tmp_path / "pretrain")])[0]
    assert sorted(out["losses"]) == [1, 2] and not out["skipped"]
    out = run_ranks(run_example, 2, "sft", common + ["--data-path", data["qa"], "--train-iters", "2", "--finetune",
                                                     "--load", str(tmp_path / "pretrain"), "--save", str(tmp_path / "sft")])[0]
    assert out["start"] == 0 and sorted(out["losses"]) == [1, 2]
    cfg = model_config_of(str(tmp_path / "sft"))
    assert isinstance(cfg, Qwen25VLConfig) and cfg.llm.mrope_section == (2, 3, 3) and cfg.vision.patch_size == 14
    history = run_ranks(run_grpo_example, 2, ["--use-checkpoint-args", "--load", str(tmp_path / "sft"), "--context-parallel-size", "2",
                                   "--video-root", data["video_root"], "--tokenizer", data["tokenizer"],
                                   "--data-path", data["qa"], "--num-frames", "3", "--group-size", "4",
                                   "--prompts-per-step", "2", "--max-new-tokens", "4", "--train-iters", "2",
                                   "--save", str(tmp_path / "grpo")])[0]
    assert len(history) == 2 and find_checkpoint(str(tmp_path / "grpo")).endswith("iter_0000002")
