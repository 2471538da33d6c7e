"""A dist checkpoint saved at TP=2 converts to a Hugging Face folder with the same weights."""

import os
import subprocess
import sys

import torch

from tests.dist import init_cpu_dist, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _save_worker(rank, world_size, root):
    init_cpu_dist()
    from megatron_longvideo.checkpoint.dist_ckpt import save_checkpoint
    from megatron_longvideo.checkpoint.full_state import gather_full_state
    from megatron_longvideo.checkpoint.hf_map import WeightMap
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=2))
    cfg = VLMConfig(llm=LLMConfig.tiny(vocab_size=128))
    torch.manual_seed(3)
    model = build_vlm(cfg, groups)
    save_checkpoint(root, 5, model=model, groups=groups, run_config={"stage": "test"})
    expected = dict(WeightMap(cfg).to_hf(gather_full_state(model, groups)))
    destroy_parallel()
    return expected


def test_dist_checkpoint_to_hf(tmp_path):
    from safetensors.torch import load_file

    expected = run_ranks(_save_worker, 2, str(tmp_path / "ckpt"))[0]
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "to-hf",
                           "--dist-checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = {}
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            written.update(load_file(str(out / name)))
    assert set(expected) <= set(written), set(expected) - set(written)
    for k, v in expected.items():
        assert torch.equal(written[k], v), k


def test_checkpoint_without_model_config_is_named(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "to-hf",
                           "--dist-checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no complete checkpoint" in proc.stderr
