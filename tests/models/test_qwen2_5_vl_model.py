"""The whole Qwen2.5-VL (issue 14, third part) against transformers' ``Qwen2_5_VLForConditionalGeneration``.

A random tiny model imported with ``load_hf_state``; a prompt with a 3-frame (odd: padded) 112 x 168
(non-square, 2 x 3 windows) video between text, 1 s between frames. Positions follow transformers 5's
text-after-video rule here (``text_after="spatial"``) to compare with the installed version. Logits
equal within 1e-4 relative in fp32 at world=1, and each CP=2 rank's shard (all_gather, p2p) equals
the matching shard of transformers' logits. The tower sharded over TP = 2 goes through ``from-hf``, a TP = 2
dist checkpoint and ``to-hf`` with every tensor and world=1's logits kept.
"""

from __future__ import annotations

import dataclasses

import torch

from tests.dist import init_cpu_dist, run_ranks

VIDEO = 5


def _hf():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=56, tokens_per_second=2),
        video_token_id=VIDEO, image_token_id=6, vision_start_token_id=7, vision_end_token_id=8)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return hf


def _prompt(cfg):
    """``(frames [3, 3, 112, 168], ids [1, S], video tokens)``: text, the video's placeholders, text."""
    g = torch.Generator().manual_seed(3)
    frames = torch.randn(3, 3, 112, 168, generator=g)
    n = cfg.num_video_tokens(3, 112, 168)
    ids = torch.cat([torch.tensor([9, 7]), torch.full((n,), VIDEO), torch.tensor([8]), torch.randint(10, 96, (9,), generator=g)])
    return frames, ids[: len(ids) // 4 * 4][None], n


@torch.no_grad()
def _transformers_logits(hf, cfg, frames, ids):
    from megatron_longvideo.models.qwen2_5_vl.vision import frames_to_patches

    patches, grid = frames_to_patches(frames, cfg.vision)
    # mm_token_type_ids (the processor's output) is what makes transformers use 3-row positions
    return hf(input_ids=ids, pixel_values_videos=patches, video_grid_thw=torch.tensor([grid]),
              second_per_grid_ts=torch.tensor([2.0]), mm_token_type_ids=(ids == VIDEO).int() * 2).logits


def _worker(rank, world_size, cp, cp_type):
    from megatron_longvideo.models.qwen2_5_vl.model import (build_qwen25vl, load_hf_state, qwen25vl_config_from_hf,
                                                            qwen_vlm_forward)
    from megatron_longvideo.models.qwen2_5_vl.vision import frames_to_patches
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.training.lm_step import cp_shard

    init_cpu_dist()
    groups = initialize_parallel(ParallelConfig(context_parallel_size=cp, cp_comm_type=cp_type))
    hf = _hf()
    cfg = dataclasses.replace(qwen25vl_config_from_hf(hf.config), text_after="spatial")
    model = build_qwen25vl(cfg, groups)
    load_hf_state(model, groups, hf.state_dict().items())
    frames, ids, n = _prompt(cfg)
    patches, grid = frames_to_patches(frames, cfg.vision)
    with torch.no_grad():
        expected = _transformers_logits(hf, cfg, frames, ids)
        ours = qwen_vlm_forward(model, groups, input_ids=ids, videos=[[frames]], seconds_per_frame=[[1.0]])
    expected = cp_shard(expected, groups)
    if cp == 1:  # ours -> transformers' names -> transformers loads it strictly -> ours: every tensor back
        from megatron_longvideo.models.qwen2_5_vl.model import hf_state

        exported = hf_state(model, groups)
        reference = hf.state_dict()
        assert sorted(exported) == sorted(reference), set(exported) ^ set(reference)
        assert all(torch.equal(exported[k], reference[k]) for k in reference)
        hf.load_state_dict(exported, strict=True)
        again = build_qwen25vl(cfg, groups, seed=9)
        load_hf_state(again, groups, exported.items())
        original = dict(model.named_parameters())
        assert all(torch.equal(p, original[k]) for k, p in again.named_parameters())
    destroy_parallel()
    return ((ours - expected).norm() / expected.norm()).item(), grid, n


def test_qwen25vl_logits_equal_transformers_at_world1_and_cp2():
    error, grid, n = run_ranks(_worker, 1, 1, "all_gather")[0]
    assert grid == [2, 8, 12] and n == 48
    assert error < 1e-4, error
    for cp_type in ("all_gather", "p2p"):
        errors = [e for e, _, _ in run_ranks(_worker, 2, 2, cp_type)]
        assert max(errors) < 1e-4, (cp_type, errors)


def test_qwen25vl_folder_round_trips_through_the_cli(tmp_path):
    """A transformers-saved Qwen2.5-VL folder -> ``from-hf`` (a dist checkpoint) -> ``to-hf``: every tensor
    and the config come back bit for bit."""
    import json
    import os
    import subprocess
    import sys

    from megatron_longvideo.checkpoint.hf_io import read_checkpoint

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _hf().save_pretrained(str(tmp_path / "src"))
    for argv in (["from-hf", "--hf", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")],
                 ["to-hf", "--dist-checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]):
        proc = subprocess.run([sys.executable, os.path.join(root, "tools", "convert_checkpoint.py"), *argv, "--no-progress"],
                              capture_output=True, text=True, timeout=600, cwd=root)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = dict(read_checkpoint(str(tmp_path / "src"))), dict(read_checkpoint(str(tmp_path / "back")))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)

    def config(d):
        return {k: v for k, v in json.load(open(os.path.join(d, "config.json"))).items() if k != "transformers_version"}

    assert config(tmp_path / "src") == config(tmp_path / "back")


def _logits(model, groups, cfg):
    """Our full logits ``[1, S, vocab]`` of :func:`_prompt` (gathered over TP's vocabulary shards)."""
    import torch.distributed as dist

    from megatron_longvideo.models.qwen2_5_vl.model import qwen_vlm_forward

    frames, ids, _ = _prompt(cfg)
    with torch.no_grad():
        out = qwen_vlm_forward(model, groups, input_ids=ids, videos=[[frames]], seconds_per_frame=[[1.0]])
    if groups.tp_size > 1:
        parts = [torch.empty_like(out) for _ in range(groups.tp_size)]
        dist.all_gather(parts, out.contiguous(), group=groups.tp)
        out = torch.cat(parts, dim=-1)
    return out


def _sharded_checkpoint_worker(rank, world_size, root):
    """TP = 2, the tower through both layouts: ``from-hf`` (the converter shards the tower itself); a model
    with the tower replicated (encode_group='tp_cp') loads it and saves; a model with it sharded
    (encode_group='cp') loads that, gives its logits and HF state, and saves a checkpoint of its own."""
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint
    from megatron_longvideo.checkpoint.hf_checkpoint import import_hf_checkpoint
    from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl, hf_state, qwen25vl_config_from_hf
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    init_cpu_dist()
    hf = _hf()
    cfg = qwen25vl_config_from_hf(hf.config)  # the config the checkpoint records (to-hf matches it to the source's)
    if rank == 0:
        hf.save_pretrained(f"{root}/src")
    dist.barrier()
    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=2))
    import_hf_checkpoint(f"{root}/src", f"{root}/from_hf", groups=groups, progress=False)
    replicated = build_qwen25vl(cfg, groups, seed=7)
    loaded = load_checkpoint(f"{root}/from_hf", model=replicated, groups=groups, weights_only=True)
    save_checkpoint(f"{root}/replicated", 1, model=replicated, groups=groups, assets=loaded.assets)
    destroy_parallel()
    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=2, encode_group="cp"))
    model = build_qwen25vl(cfg, groups, seed=9)
    load_checkpoint(f"{root}/replicated", model=model, groups=groups, weights_only=True)
    shard = model.vision.layers[0].mlp.linear_fc1.weight.shape[0]
    logits = _logits(model, groups, cfg)
    exported, reference = hf_state(model, groups), hf.state_dict()
    exact = sorted(exported) == sorted(reference) and all(torch.equal(exported[k], reference[k]) for k in reference)
    save_checkpoint(f"{root}/sharded", 1, model=model, groups=groups, assets=loaded.assets)
    destroy_parallel()
    groups = initialize_parallel(ParallelConfig(pipeline_parallel_size=2))  # the tower on the first stage only
    staged = build_qwen25vl(cfg, groups, seed=9)
    load_checkpoint(f"{root}/sharded", model=staged, groups=groups, weights_only=True)
    exported = hf_state(staged, groups)
    exact = exact and sorted(exported) == sorted(reference) and all(torch.equal(exported[k], reference[k]) for k in reference)
    destroy_parallel()
    return {"sharded": (replicated.vision.sharded, model.vision.sharded), "fc1_rows": shard, "logits": logits,
            "exact": exact}


def _world1_worker(rank, world_size, root):
    """world = 1: the logits of the ``from-hf`` checkpoint, and ``to-hf`` of the sharded TP = 2 checkpoint."""
    from megatron_longvideo.checkpoint.dist_ckpt import load_checkpoint
    from megatron_longvideo.checkpoint.hf_checkpoint import export_dist_checkpoint
    from megatron_longvideo.models.qwen2_5_vl.model import build_qwen25vl, qwen25vl_config_from_hf
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel

    init_cpu_dist()
    groups = initialize_parallel(ParallelConfig())
    cfg = qwen25vl_config_from_hf(_hf().config)
    model = build_qwen25vl(cfg, groups, seed=5)
    load_checkpoint(f"{root}/from_hf", model=model, groups=groups, weights_only=True)
    logits = _logits(model, groups, cfg)
    destroy_parallel()
    export_dist_checkpoint(f"{root}/sharded", f"{root}/back", progress=False)
    return logits


def test_qwen25vl_sharded_tower_through_from_hf_dist_checkpoint_and_to_hf(tmp_path):
    """The tower sharded over TP = 2 (encode_group='cp') through every checkpoint path: ``from-hf`` into
    TP = 2 slices each rank's q/k/v, gate/up and merger shards; TP = 2 dist checkpoints move between the
    sharded and the replicated tower both ways; the sharded model's full-state gather is transformers'
    state bit for bit and its logits are world=1's (from the ``from-hf`` checkpoint) within 1e-5 relative;
    its own TP = 2 checkpoint written back to HF (and read at PP = 2) reproduces every source tensor and
    the config."""
    import json
    import os

    from megatron_longvideo.checkpoint.hf_io import read_checkpoint

    root = str(tmp_path)
    tp2 = run_ranks(_sharded_checkpoint_worker, 2, root)
    world1 = run_ranks(_world1_worker, 1, root)[0]
    assert all(r["sharded"] == (False, True) and r["fc1_rows"] == 40 for r in tp2), \
        [(r["sharded"], r["fc1_rows"]) for r in tp2]
    assert all(r["exact"] for r in tp2)
    for r in tp2:
        assert ((r["logits"] - world1).norm() / world1.norm()).item() < 1e-5
    a, b = dict(read_checkpoint(os.path.join(root, "src"))), dict(read_checkpoint(os.path.join(root, "back")))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)

    def config(d):
        return {k: v for k, v in json.load(open(os.path.join(d, "config.json"))).items() if k != "transformers_version"}

    assert config(os.path.join(root, "src")) == config(os.path.join(root, "back"))
