"""Starting from a public checkpoint at real shapes, and handing the result back to transformers users.

* The 7B shape from its Hugging Face config, built on the meta device: our parameter count plus the
  tensors we carry through unused equals transformers' count for the same config, exactly.
* ``--hf-config`` fills every shape flag; a shape flag that disagrees with it is refused, naming both.
* HF -> ours -> HF through the CLI, converting on one process and on two (TP=2), reproduces every tensor
  of a transformers-built model bit for bit (SigLIP's pooling head included) and its config.
* The whole path a new user takes: a transformers-built tiny LLaVA-OneVision with its tokenizer ->
  ``from-hf`` -> two GRPO steps of ``train_grpo.py --load`` at CP=2 -> ``to-hf`` -> transformers loads
  it, ``generate`` on a video prompt stops at eos, and ``AutoProcessor`` (when torchvision can be put on
  the path: see ``hf_processor_check.py``) expands the video into the number of tokens our model takes.

Checked against transformers 5.24 (the installed version is printed by the version test in test_hf_map).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.checkpoint import hf_fixtures as fx
from tests.dist import init_cpu_dist, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERT = os.path.join(ROOT, "tools", "convert_checkpoint.py")

# LLaVA-OneVision-Qwen2-7B's shape: the Qwen2-7B text model and the SigLIP-so400m/14 tower at 384 px
LLAVA_OV_7B = {
    "text_config": {"model_type": "qwen2", "vocab_size": 152128, "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": False},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                      "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
                      "vision_use_head": False},
    "image_token_index": 151646, "video_token_index": 151647, "vision_feature_select_strategy": "full",
    "vision_feature_layer": -1, "tie_word_embeddings": False,
}


def _convert(*argv, timeout=600):
    proc = subprocess.run([sys.executable, CONVERT, *argv, "--no-progress"], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _count_worker(rank, world_size, cfg):
    init_cpu_dist()
    from megatron_longvideo.models.llava_onevision.model import build_vlm
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig())
    with torch.device("meta"):
        model = build_vlm(cfg, groups, device="cpu")
    count = sum(p.numel() for p in model.parameters())
    destroy_parallel()
    return count


def test_7b_shape_from_its_hf_config_has_transformers_parameter_count():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from megatron_longvideo.models.llava_onevision.hf import vlm_config_from_hf
    from megatron_longvideo.checkpoint.hf_map import WeightMap

    config = LlavaOnevisionConfig(**LLAVA_OV_7B)
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in LlavaOnevisionForConditionalGeneration(config).parameters())
    cfg = vlm_config_from_hf(config)
    assert (cfg.llm.rotary_base, cfg.llm.ffn_hidden_size, cfg.llm.vocab_size, cfg.vision.ffn_hidden_size,
            cfg.vision.image_size, cfg.vision.patch_size) == (1e6, 18944, 152128, 4304, 384, 14)
    ours = run_ranks(_count_worker, 1, cfg)[0]
    carried = sum(t.numel() for t in WeightMap(cfg).extras.values())  # SigLIP's post-layernorm, unused by LLaVA-OV
    assert ours + carried == hf_count, (ours, carried, hf_count)
    assert 8.0e9 < hf_count < 8.1e9


def test_hf_config_flag_fills_the_shapes_and_refuses_a_disagreeing_flag(tmp_path):
    from transformers import LlavaOnevisionConfig

    from megatron_longvideo.data.tokenizer import load_tokenizer
    from megatron_longvideo.training.args import model_config, parse

    texts = ["what colour is the shape", "the shape is red"] * 20
    tok = fx.make_tokenizer(texts, str(tmp_path / "tok"))
    small = json.loads(json.dumps(LLAVA_OV_7B))
    small["text_config"].update(vocab_size=512, hidden_size=64, intermediate_size=80, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2)
    small["vision_config"].update(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=3,
                                  image_size=56, patch_size=14)
    small["video_token_index"] = tok.convert_tokens_to_ids("<video>")
    LlavaOnevisionConfig(**small).save_pretrained(str(tmp_path / "hf"))
    ours = load_tokenizer(str(tmp_path / "tok"))
    cfg = model_config(parse(["--hf-config", str(tmp_path / "hf"), "--max-frames", "64"]), ours)
    assert (cfg.llm.hidden_size, cfg.llm.ffn_hidden_size, cfg.llm.num_layers, cfg.llm.rotary_base, cfg.llm.vocab_size) == \
        (64, 80, 3, 1e6, 512)
    assert (cfg.vision.hidden_size, cfg.vision.ffn_hidden_size, cfg.vision.num_attention_heads, cfg.vision.grid,
            cfg.vision.max_frames) == (48, 100, 3, 4, 64)
    assert model_config(parse(["--hf-config", str(tmp_path / "hf"), "--hidden-size", "64", "--max-frames", "64"]),
                        ours) == cfg  # a flag that agrees is fine
    with pytest.raises(ValueError, match="--hidden-size=32 disagrees with --hf-config"):
        model_config(parse(["--hf-config", str(tmp_path / "hf"), "--hidden-size", "32"]), ours)
    with pytest.raises(ValueError, match="does not split over --tensor-model-parallel-size 3"):
        model_config(parse(["--hf-config", str(tmp_path / "hf"), "--tensor-model-parallel-size", "3"]), ours)
    # the flags alone now reach the same non-default fields
    flags = model_config(parse(["--rotary-base", "1e6", "--norm-epsilon", "1e-5", "--vision-ffn-hidden-size", "100",
                                "--vision-hidden-size", "48", "--tie-embeddings-and-output-weights"]), ours)
    assert (flags.llm.rotary_base, flags.llm.norm_eps, flags.vision.ffn_hidden_size, flags.llm.tie_word_embeddings) == \
        (1e6, 1e-5, 100, True)


def _convert_worker(rank, world_size, hf_dir, out):
    from megatron_longvideo.checkpoint.convert_cli import main
    from megatron_longvideo.checkpoint.dist_ckpt import close_checkpoint_writer

    init_cpu_dist()
    try:
        return main(["from-hf", "--hf", hf_dir, "--out", out, "--tensor-model-parallel-size", "2", "--no-progress"])
    finally:
        close_checkpoint_writer()


def _same_files(a: str, b: str) -> None:
    """Every tensor of the safetensors files of folder ``a`` equals folder ``b``'s, bit for bit (dtype too)."""
    from megatron_longvideo.checkpoint.hf_io import read_checkpoint

    left, right = dict(read_checkpoint(a)), dict(read_checkpoint(b))
    assert sorted(left) == sorted(right), set(left) ^ set(right)
    for name, t in left.items():
        assert t.dtype == right[name].dtype and torch.equal(t.view(torch.uint8), right[name].view(torch.uint8)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_to_ours_to_hf_through_the_cli_is_bit_exact(tmp_path, dtype):
    texts = ["what colour is the shape", "the shape is red"] * 20
    tok = fx.make_tokenizer(texts, str(tmp_path / "tok"))
    src = str(tmp_path / "src")
    fx.make_llava_onevision(tok, src, dtype=dtype)
    assert any(n.startswith("vision_tower.") and ".head." in n for n in _names(src))  # SigLIP's pooling head
    _convert("from-hf", "--hf", src, "--out", str(tmp_path / "ckpt"))
    _convert("to-hf", "--dist-checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"))
    _same_files(src, str(tmp_path / "back"))
    config = lambda d: {k: v for k, v in json.load(open(os.path.join(d, "config.json"))).items() if k != "transformers_version"}  # noqa: E731
    assert config(src) == config(tmp_path / "back")
    if dtype == torch.float32:  # the conversion split over two processes writes the same checkpoint
        assert run_ranks(_convert_worker, 2, src, str(tmp_path / "ckpt_tp2")) == [0, 0]
        _convert("to-hf", "--dist-checkpoint", str(tmp_path / "ckpt_tp2"), "--out", str(tmp_path / "back_tp2"))
        _same_files(src, str(tmp_path / "back_tp2"))


def test_a_qwen2_folder_round_trips_through_a_dist_checkpoint(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rope_theta=2e5, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(str(tmp_path / "src"))
    _convert("from-hf", "--hf", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt"))
    _convert("to-hf", "--dist-checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"))
    _same_files(str(tmp_path / "src"), str(tmp_path / "back"))


def _names(folder):
    from megatron_longvideo.checkpoint.hf_io import checkpoint_names

    return checkpoint_names(folder)


def length_reward(inp) -> float:
    """Rollout reward for the end-to-end test: decoded length (random rollouts differ in it)."""
    return len(inp.response) / 10.0


def _frames(tmp_path, data) -> str:
    """The first record's video, decoded and sampled as our loader does, as uint8 [T, H, W, 3] in a .npy."""
    import numpy as np

    from megatron_longvideo.data import FrameSamplingConfig, load_records
    from megatron_longvideo.data.video import decode_resized_uint8

    record = load_records(data["qa"]).records[0]
    frames = decode_resized_uint8(os.path.join(data["video_root"], record.video),
                                FrameSamplingConfig(num_frames=fx.FRAMES, image_size=fx.IMAGE_SIZE))[0]
    path = str(tmp_path / "frames.npy")
    np.save(path, frames.permute(0, 2, 3, 1).contiguous().numpy())
    return path


def _torchvision_path(tmp_path):
    """A folder holding torchvision unpacked from the wheel ``MLV_TORCHVISION_WHEEL`` names (.ci/run downloads
    it), or None."""
    wheel = os.environ.get("MLV_TORCHVISION_WHEEL")
    if not wheel or not os.path.isfile(wheel):
        return None
    from tests.tv_shim import unpack

    return unpack(wheel, str(tmp_path / "torchvision"))


def test_public_checkpoint_to_grpo_at_cp2_to_transformers(tmp_path):
    import numpy as np
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from megatron_longvideo.checkpoint.dist_ckpt import find_checkpoint, model_config_of
    from megatron_longvideo.data import load_records
    from megatron_longvideo.data.prompts import PromptConfig, render_example_text
    from megatron_longvideo.data.tokenizer import SpecialTokens
    from tests.training.helpers import make_data, run_example, run_grpo_example

    data = make_data(str(tmp_path / "data"), num_videos=4)
    texts = [t for r in load_records(data["qa"]).records for t in render_example_text(r, PromptConfig(), SpecialTokens())]
    src = str(tmp_path / "public")
    fx.make_llava_onevision(fx.make_tokenizer(texts, str(tmp_path / "tok")), src)

    _convert("from-hf", "--hf", src, "--out", str(tmp_path / "init"))
    # the SFT and projector-pretraining scripts start from it too (no optimizer state in it: weights only)
    for script, records, extra in (("sft", data["qa"], []), ("pretrain", data["captions"], ["--finetune"])):
        trained = run_ranks(run_example, 1, script, [
            "--load", str(tmp_path / "init"), "--use-checkpoint-args", "--data-path", records, "--video-root",
            data["video_root"], "--num-frames", str(fx.FRAMES), "--train-iters", "1", "--save", str(tmp_path / script),
            *extra])[0]
        assert trained["start"] == 0 and sorted(trained["losses"]) == [1], trained
        saved = find_checkpoint(str(tmp_path / script))
        assert sorted(os.listdir(os.path.join(saved, "hf"))) == sorted(os.listdir(os.path.join(tmp_path / "init" / "iter_0000000" / "hf")))
    out = run_ranks(run_grpo_example, 2, [
        "--load", str(tmp_path / "init"), "--use-checkpoint-args", "--context-parallel-size", "2",
        "--data-path", data["qa"], "--video-root", data["video_root"], "--num-frames", str(fx.FRAMES),
        "--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "6", "--train-iters", "2", "--lr", "1e-4",
        "--reward", "tests.checkpoint.test_hf_start:length_reward=1.0", "--save", str(tmp_path / "grpo"),
        "--log-samples-every", "0"])
    assert len(out[0]) == 2  # two GRPO steps, per-step mean rewards
    ckpt = find_checkpoint(str(tmp_path / "grpo"))
    assert ckpt.endswith("iter_0000002") and os.path.isfile(os.path.join(ckpt, "hf", "unused.safetensors"))
    cfg = model_config_of(ckpt)

    hf = str(tmp_path / "hf")
    _convert("to-hf", "--dist-checkpoint", str(tmp_path / "grpo"), "--out", hf)
    files = set(os.listdir(hf))
    assert {"generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
            "processor_config.json", "tokenizer.json", "chat_template.jinja", "config.json"} <= files, files
    generation = json.load(open(os.path.join(hf, "generation_config.json")))
    tok = AutoTokenizer.from_pretrained(hf)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert eos in (generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]])
    assert generation["pad_token_id"] == pad

    from megatron_longvideo.checkpoint.hf_io import read_checkpoint

    before, after = dict(read_checkpoint(src)), dict(read_checkpoint(hf))
    assert sorted(before) == sorted(after)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(n.startswith("model.language_model.") or n.startswith("language_model.") or "lm_head" in n
                           for n in changed), changed  # GRPO trained the LLM; the frozen tower and its head are kept
    assert any(".head." in n for n in before)

    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    frames = np.load(_frames(tmp_path, data))
    prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what colour"}]}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt.count("<video>") == 1 and prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt.replace("<video>", "<video>" * cfg.vision.num_video_tokens(fx.FRAMES)))["input_ids"]
    pixels = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([ids]), pixel_values_videos=pixels[None], max_new_tokens=8,
                                   do_sample=False)[0, len(ids):].tolist()
    assert generated and generated[-1] == eos and len(generated) < 8, generated

    # the language model alone, for text-only users and rollout engines
    llm_dir = str(tmp_path / "hf_llm")
    _convert("to-hf", "--dist-checkpoint", str(tmp_path / "grpo"), "--out", llm_dir, "--llm-only")
    from transformers import Qwen2ForCausalLM

    llm, info = Qwen2ForCausalLM.from_pretrained(llm_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not {"preprocessor_config.json", "processor_config.json"} & set(os.listdir(llm_dir))
    alone = dict(read_checkpoint(llm_dir))
    lm = {n: t for n, t in after.items() if "language_model" in n or n.startswith("lm_head")}
    assert len(alone) == len(lm) and all(any(torch.equal(t, u) for u in lm.values()) for t in alone.values())
    assert llm.generation_config.eos_token_id in (eos, [eos]) or eos in llm.generation_config.eos_token_id

    tv = _torchvision_path(tmp_path)
    if tv is None:
        pytest.skip("AutoProcessor not run: transformers' LLaVA-OneVision video processor needs torchvision, which "
                    "this environment lacks (set MLV_TORCHVISION_WHEEL to a torchvision wheel; .ci/run does)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tv, ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "checkpoint", "hf_processor_check.py"), hf,
                           str(tmp_path / "frames.npy"), "8"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["processor"] == "LlavaOnevisionProcessor"
    assert report["num_video_tokens"] == cfg.vision.num_video_tokens(fx.FRAMES), report
    assert report["pixel_max_diff"] < 1e-5, report
    assert report["new_tokens"] and report["new_tokens"][-1] == eos and len(report["new_tokens"]) < 8, report
