"""The three entry scripts with ``--model-family qwen2_5_vl`` on the synthetic videos, 2 ranks at CP=2,
with a tokenizer shaped like Qwen2.5-VL's public ones (its vision tokens, the response tags as plain
text): projector (merger) pretraining, CoT-SFT from it with ``--finetune``, then GRPO from the SFT weights
with ``--use-checkpoint-args`` (the Qwen2.5-VL shape read back from the checkpoint). The result is
exported with ``to-hf`` (the run did not start from a Qwen folder, so the processor configs and the chat
template are written, not carried) and handed to transformers: its chat template renders our prompt,
``Qwen2_5_VLForConditionalGeneration`` loads it strictly and, when torchvision can be put on the path
(see ``tests/checkpoint/hf_processor_check.py``), ``AutoProcessor`` turns the video into the pixels, grid
and token ids our training used."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.dist import run_ranks
from tests.training.helpers import make_data, run_example, run_grpo_example

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _qwen_tokenizer(data, folder):
    from megatron_longvideo.data import load_records
    from megatron_longvideo.data.prompts import PromptConfig, render_example_text
    from megatron_longvideo.models.qwen2_5_vl.inputs import SPECIAL_TOKENS
    from tests.checkpoint import hf_fixtures as fx

    records = load_records(data["qa"]).records + load_records(data["captions"], kind="caption").records
    texts = [t for r in records for t in render_example_text(r, PromptConfig(), SPECIAL_TOKENS)]
    fx.make_tokenizer(texts, folder, special=fx.QWEN_SPECIAL)
    return folder


def _frames(data, path):
    """The first record's video as our loader samples it for this run (3 frames, 56 px), uint8 [T, H, W, 3]."""
    import numpy as np

    from megatron_longvideo.data import FrameSamplingConfig, load_records
    from megatron_longvideo.data.video import decode_resized_uint8

    record = load_records(data["qa"]).records[0]
    frames = decode_resized_uint8(os.path.join(data["video_root"], record.video),
                                  FrameSamplingConfig(num_frames=3, image_size=56))[0]
    np.save(path, frames.permute(0, 2, 3, 1).contiguous().numpy())
    return path


def test_qwen25vl_family_through_pretrain_sft_grpo_and_back_to_transformers(tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from megatron_longvideo.checkpoint.dist_ckpt import find_checkpoint, model_config_of
    from megatron_longvideo.data.prompts import PromptConfig, _tokenize_prompt, render_prompt
    from megatron_longvideo.data.tokenizer import load_tokenizer
    from megatron_longvideo.models.qwen2_5_vl.inputs import SPECIAL_TOKENS
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig

    data = make_data(str(tmp_path / "data"), num_videos=4, family="qwen2_5_vl")
    tokenizer = _qwen_tokenizer(data, str(tmp_path / "tokenizer"))
    common = ["--model-family", "qwen2_5_vl", "--context-parallel-size", "2", "--video-root", data["video_root"],
              "--tokenizer", tokenizer, "--num-frames", "3", "--seed", "3"]
    out = run_ranks(run_example, 2, "pretrain", common + ["--data-path", data["captions"], "--train-iters", "2",
                                                          "--save", str(tmp_path / "pretrain")])[0]
    assert sorted(out["losses"]) == [1, 2] and not out["skipped"]
    out = run_ranks(run_example, 2, "sft", common + ["--data-path", data["qa"], "--train-iters", "2", "--finetune",
                                                     "--load", str(tmp_path / "pretrain"), "--save", str(tmp_path / "sft")])[0]
    assert out["start"] == 0 and sorted(out["losses"]) == [1, 2]
    cfg = model_config_of(str(tmp_path / "sft"))
    assert isinstance(cfg, Qwen25VLConfig) and cfg.llm.mrope_section == (2, 3, 3) and cfg.vision.patch_size == 14
    history = run_ranks(run_grpo_example, 2, ["--use-checkpoint-args", "--load", str(tmp_path / "sft"), "--context-parallel-size", "2",
                                   "--video-root", data["video_root"], "--tokenizer", tokenizer,
                                   "--data-path", data["qa"], "--num-frames", "3", "--group-size", "4",
                                   "--prompts-per-step", "2", "--max-new-tokens", "4", "--train-iters", "2",
                                   "--save", str(tmp_path / "grpo")])[0]
    assert len(history) == 2 and find_checkpoint(str(tmp_path / "grpo")).endswith("iter_0000002")

    hf = str(tmp_path / "hf")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "to-hf", "--dist-checkpoint",
                           str(tmp_path / "grpo"), "--out", hf, "--tokenizer", tokenizer, "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json", "chat_template.jinja",
            "generation_config.json", "tokenizer.json"} <= set(os.listdir(hf))
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    config = PromptConfig()
    text = "what colour is the shape"
    ours = render_prompt(text, config, SPECIAL_TOKENS)
    messages = [{"role": "system", "content": config.system_prompt},
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    assert AutoTokenizer.from_pretrained(hf).apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == ours
    assert "<|vision_start|><|video_pad|><|vision_end|>what colour" in ours

    wheel = os.environ.get("MLV_TORCHVISION_WHEEL")
    if not wheel or not os.path.isfile(wheel):
        pytest.skip("AutoProcessor not run: transformers' Qwen2-VL video processor needs torchvision, which this "
                    "environment lacks (set MLV_TORCHVISION_WHEEL to a torchvision wheel; .ci/run does)")
    from tests.tv_shim import unpack

    tv = unpack(wheel, str(tmp_path / "torchvision"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tv, ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "checkpoint", "hf_processor_check.py"), hf,
                           _frames(data, str(tmp_path / "frames.npy")), "4", config.system_prompt],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    n = cfg.num_video_tokens(3, 56, 56)
    ids, _ = _tokenize_prompt(load_tokenizer(tokenizer, special=SPECIAL_TOKENS), ours, n)
    assert report["processor"] == "Qwen2_5_VLProcessor" and report["prompt"] == ours, report
    assert report["num_video_tokens"] == n and report["input_ids"] == ids, report
    assert report["processor_grid"] == report["grid"] == [2, 4, 4], report
    assert report["pixel_max_diff"] is not None and report["pixel_max_diff"] < 1e-5, report
    assert report["new_tokens"], report
