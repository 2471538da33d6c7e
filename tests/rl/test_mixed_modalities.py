"""Text-only, image, two-video and video records in one dataset: read, decoded (frame-sharded at CP=2), drawn
by the prompt stream and trained by GRPO. Two steps at CP=2 with shared-prefix packing equal world=1
unpacked (losses, rollouts, updated weights), for both model families; the cache, parallel encoding and
merge take each prompt's list of visual inputs (none for the text-only one)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.dist import init_cpu_dist, run_ranks
from tests.rl.test_grpo_e2e import VOCAB_TEXTS, _assert_same_runs, _family


def text_length_reward(inp) -> float:
    """A reward that varies across random rollouts (the decoded length)."""
    return len(inp.response) / 10.0


def _write_mixed(root: str, size: int) -> str:
    """Videos, an image and a records file with one record of each kind; returns the records' path."""
    from megatron_longvideo.data.synthetic import write_synthetic_image, write_synthetic_video

    os.makedirs(os.path.join(root, "media"), exist_ok=True)
    for i, frames in enumerate((6, 9, 8)):
        write_synthetic_video(os.path.join(root, "media", f"v{i}.mp4"), num_frames=frames, size=size, seed=i)
    write_synthetic_image(os.path.join(root, "media", "i0.png"), size=size, seed=5)
    question = "what colour is the shape\nA. red\nB. blue"
    records = [
        {"problem_id": "text", "data_type": "text", "problem": "answer with the letter of the option\nA. a b\nB. c d",
         "answer": "A"},
        {"problem_id": "image", "images": ["media/i0.png"], "problem": question, "answer": "B"},
        {"problem_id": "two-videos", "videos": ["media/v0.mp4", "media/v1.mp4"], "problem": question, "answer": "A"},
        {"problem_id": "video", "videos": "media/v2.mp4", "problem": question, "answer": "B"},
    ]
    path = os.path.join(root, "mixed.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def train_two_steps(cfg, build, tok, groups, stream, pack: bool) -> dict:
    """Two GRPO steps of a fresh policy (and reference) of ``cfg`` on the prompts of ``stream``: the losses,
    rewards, final weights, last metrics and what was drawn (id, each input's shape)."""
    from megatron_longvideo.checkpoint.full_state import gather_full_state
    from megatron_longvideo.rl.engines import build_engine
    from megatron_longvideo.rl.engines.base import SamplingConfig
    from megatron_longvideo.rl.losses import GRPOLossConfig
    from megatron_longvideo.rl.trainer import GRPOConfig, GRPOTrainer
    from megatron_longvideo.training.engine import OptimConfig, build_optimizer, wrap_ddp

    torch.manual_seed(7)
    policy = build(cfg, groups)
    torch.manual_seed(7)
    reference = build(cfg, groups)
    reference.requires_grad_(False)
    ddp = wrap_ddp(policy, groups)
    optimizer = build_optimizer([ddp], OptimConfig(lr=1e-2, adam_eps=1e-3, clip_grad=1.0))
    grpo = GRPOConfig(
        group_size=4, prompts_per_step=2, pack=pack, sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, seed=11),
        loss=GRPOLossConfig(kl_beta=0.05, clip_eps_high=0.28),
        rewards=((f"{__name__}:text_length_reward", 1.0), ("format", 0.1)),
        update_epochs=2, groups_per_microbatch=2, log_samples_every=0,
    )
    engine = build_engine("hf", cfg, tokenizer=tok, pad_token_id=tok.pad_id)
    trainer = GRPOTrainer(grpo, policy=ddp, optimizer=optimizer, groups=groups, tokenizer=tok, engine=engine,
                          reference=reference, log=lambda s: None)
    drawn, losses, rewards = [], [], []

    def draw(k):
        prompts = stream.draw(k)
        drawn.extend((p.sample_id, [tuple(v.shape) for v in p.videos], len(p.prompt_ids)) for p in prompts)
        return prompts

    for _ in range(2):
        metrics = trainer.step(draw)
        losses.append(metrics["train/loss"])
        rewards.append(metrics["reward/mean"])
    return {"losses": losses, "rewards": rewards, "weights": gather_full_state(ddp, groups), "metrics": metrics,
            "drawn": drawn, "skips": stream.skip_report.counts()}


def _worker(rank, world_size, root, tok_path, family, pack):
    init_cpu_dist()
    from megatron_longvideo.data.dataset import LongVideoDataset, VideoDatasetConfig
    from megatron_longvideo.data.sampler import DistributedVideoSampler
    from megatron_longvideo.data.sampling import FrameSamplingConfig
    from megatron_longvideo.data.tokenizer import load_tokenizer
    from megatron_longvideo.models.encode import encode_shard
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.prompt_stream import PromptStream

    tok = load_tokenizer(tok_path)
    groups = initialize_parallel(ParallelConfig(context_parallel_size=world_size), seed=7)
    cfg, build, size, video_tokens = _family(family, tok)
    sharded = world_size > 1  # each rank decodes its slice of every video; world 1 decodes them whole
    data = VideoDatasetConfig(mode="rl", video_root=root, sampling=FrameSamplingConfig(num_frames=4, image_size=size),
                              decode="lazy" if sharded else "full")
    dataset = LongVideoDataset.from_file(os.path.join(root, "mixed.jsonl"), tokenizer=tok,
                                         num_video_tokens=video_tokens, config=data)
    sampler = DistributedVideoSampler(len(dataset), dp_rank=0, dp_size=1, seed=0, shuffle=False, drop_last=False)
    stream = PromptStream(dataset, sampler, shard=encode_shard(groups, cfg.vision) if sharded else None,
                          group=groups.tp_cp)
    out = train_two_steps(cfg, build, tok, groups, stream, pack)
    stream.close()
    destroy_parallel()
    return out


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_mixed_dataset_grpo_cp2_packed_equals_world1_unpacked(tmp_path, family):
    from megatron_longvideo.data.tokenizer import train_sentencepiece

    tok_path = train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300)
    size = 56 if family == "qwen2_5_vl" else 32
    _write_mixed(str(tmp_path), size)
    ref = run_ranks(_worker, 1, str(tmp_path), tok_path, family, False)[0]
    got = run_ranks(_worker, 2, str(tmp_path), tok_path, family, True)
    # every kind reached the trainer, each with its own visual inputs (an image: one frame; text: none)
    kinds = {sample_id: shapes for sample_id, shapes, _ in ref["drawn"]}
    assert set(kinds) == {"text", "image", "two-videos", "video"}
    assert kinds["text"] == [] and kinds["image"] == [(1, 3, size, size)]
    assert kinds["two-videos"] == [(4, 3, size, size)] * 2 and kinds["video"] == [(4, 3, size, size)]
    for r in got:
        assert r["drawn"] == ref["drawn"], "the ranks of the replica must draw the same prompts as world 1"
    _assert_same_runs(got, ref)
    m = ref["metrics"]
    assert m["train/loss"] != 0.0 and m["train/grad_norm"] > 0 and m["reward/std"] > 0
    assert m["cache/hits_this_step"] > 0, "the passes after the rollout reuse the cached visual inputs"
