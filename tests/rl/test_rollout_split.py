"""Every rank generates: the responses of a step divided among the TP x CP ranks of a replica equal one rank
drawing them all.

A tiny LLaVA-OneVision-family policy, 3 prompts x G=4 responses, sampled (temperature 1, top-p 0.9) through
``GRPOTrainer.generate``. At world=1 one ``hf`` engine draws all 12; at CP=2 and TP2xCP2 every rank holds an
engine and draws its contiguous share (6 or 3 responses, cutting across prompts), and the shares are
gathered. The tokens must be identical and the engines' log-probs equal within fp32 tolerance, each rank
must have drawn exactly its share, and the leader-only layout (one engine per replica) must give the same
tokens again. Plus the share arithmetic and the refusal of engines on some ranks only.
"""

from __future__ import annotations

import types

import pytest
import torch

from tests.dist import init_cpu_dist, run_ranks

VOCAB = 128
VIDEO_ID = 3
G = 4


def _prompts(cfg):
    from megatron_longvideo.models.video_cache import content_id_of_frames
    from megatron_longvideo.rl.rewards import GroundTruth
    from megatron_longvideo.rl.rollout import RLPrompt

    g = torch.Generator().manual_seed(1)
    out = []
    for i, (frames, text) in enumerate(((2, 5), (1, 9), (2, 3))):
        n = cfg.vision.num_video_tokens(frames)
        ids = torch.randint(4, VOCAB, (n + text,), generator=g)
        ids[1 : 1 + n] = VIDEO_ID
        video = torch.randn(frames, 3, 32, 32, generator=g)
        out.append(RLPrompt(videos=(video,), prompt_ids=ids, ground_truth=GroundTruth(answer="A"),
                            content_ids=(content_id_of_frames(video),), sample_id=f"p{i}"))
    return out


def _worker(rank, world_size, tp, engines, kind="hf"):
    init_cpu_dist()
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.engines import SamplingConfig, build_engine
    from megatron_longvideo.rl.rollout import is_replica_leader
    from megatron_longvideo.rl.trainer import GRPOConfig, GRPOTrainer
    from megatron_longvideo.checkpoint.full_state import gather_full_state

    groups = initialize_parallel(ParallelConfig(tensor_parallel_size=tp, context_parallel_size=world_size // tp))
    torch.manual_seed(0)
    cfg = VLMConfig(llm=LLMConfig.tiny(vocab_size=VOCAB, init_std=0.2), video_token_id=VIDEO_ID)
    model = build_vlm(cfg, groups)
    weights = gather_full_state(model, groups, select=lambda n: not n.startswith("vision."))  # a collective
    engine, drawn = None, []
    if engines == "every" or is_replica_leader(groups):
        engine = build_engine("hf", cfg) if kind == "hf" else build_engine("megatron", cfg, policy=model, groups=groups)
        engine.sync_weights(weights)
        generate = engine.generate

        def counted(prompt_embeds, sampling, **kwargs):
            drawn.append(sum(len(s) for s in kwargs["seeds"]))
            return generate(prompt_embeds, sampling, **kwargs)

        engine.generate = counted
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=5, seed=3, logprobs=True)
    trainer = GRPOTrainer(GRPOConfig(group_size=G, prompts_per_step=3, sampling=sampling), policy=model, optimizer=None,
                          groups=groups, tokenizer=types.SimpleNamespace(pad_id=0, eos_id=2), engine=engine)
    tokens, logprobs = trainer.generate(_prompts(cfg), with_logprobs=True)
    first = list(drawn)
    again = trainer.generate(_prompts(cfg))  # the next round: other seeds
    out = {"tokens": tokens, "logprobs": logprobs, "drawn": first, "shares": trainer.split.shares,
           "next_round_differs": again != tokens}
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def one_rank():
    return run_ranks(_worker, 1, 1, "every")[0]


@pytest.mark.parametrize("world, tp, kind", [(2, 1, "hf"), (4, 2, "hf"), (4, 2, "megatron")],
                         ids=["cp2", "tp2xcp2", "tp2xcp2-megatron"])
def test_every_rank_draws_its_share_and_the_tokens_equal_one_rank(one_rank, world, tp, kind):
    """The ``megatron`` engine runs on the TP ranks together: one share per CP rank, drawn by both of its TP
    ranks; its tokens equal the ``hf`` engine's at world=1."""
    ranks = run_ranks(_worker, world, tp, "every", kind, timeout=240)
    shares = world // tp if kind == "megatron" else world
    assert one_rank["drawn"] == [3 * G] and one_rank["next_round_differs"]
    for out in ranks:
        assert out["shares"] == shares
        assert out["tokens"] == one_rank["tokens"], "the split rollouts differ from one rank's"
        for mine, ref in zip(out["logprobs"], one_rank["logprobs"]):
            for a, b in zip(mine, ref):
                assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    assert [out["drawn"] for out in ranks] == [[3 * G // shares]] * world, "each rank must draw its share only"


def test_the_replica_leader_alone_draws_the_same_tokens(one_rank):
    ranks = run_ranks(_worker, 2, 1, "leader", timeout=240)
    assert [out["shares"] for out in ranks] == [1, 1]
    assert [out["drawn"] for out in ranks] == [[3 * G], []]
    assert all(out["tokens"] == one_rank["tokens"] for out in ranks)


def test_response_shares_are_contiguous_and_cover_every_response():
    from megatron_longvideo.rl.rollout import response_shares

    for prompts, g, shares in ((3, 4, 2), (3, 4, 4), (2, 8, 3), (1, 2, 4)):
        split = response_shares(prompts, g, shares)
        flat = [(i, r) for share in split for i, rs in share for r in rs]
        assert flat == [(i, r) for i in range(prompts) for r in range(g)]
        sizes = [sum(len(rs) for _, rs in share) for share in split]
        assert max(sizes) - min(sizes) <= 1
    assert response_shares(3, 4, 2) == [[(0, [0, 1, 2, 3]), (1, [0, 1])], [(1, [2, 3]), (2, [0, 1, 2, 3])]]


def _some_engines_worker(rank, world_size):
    init_cpu_dist()
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.rl.rollout import agree_rollout_split

    groups = initialize_parallel(ParallelConfig(context_parallel_size=world_size))
    try:
        agree_rollout_split(groups, object() if rank == 1 else None)
        return None
    except ValueError as e:
        return str(e)
    finally:
        destroy_parallel()


def test_engines_on_some_ranks_only_are_refused_by_name():
    errors = run_ranks(_some_engines_worker, 2)
    assert all(e and "ranks [1] of [0, 1] hold one" in e for e in errors), errors


def test_rollout_view_takes_frames_uniformly_and_shrinks_the_video_run():
    from megatron_longvideo.models.llm import LLMConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig
    from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig
    from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig
    from megatron_longvideo.rl.rollout import ROLLOUT_SECONDS_PER_FRAME, RLPrompt, rollout_view, video_token_count

    llava = VLMConfig(llm=LLMConfig.tiny(vocab_size=VOCAB), video_token_id=VIDEO_ID)
    qwen = Qwen25VLConfig(llm=LLMConfig(vocab_size=VOCAB, mrope_section=(2, 3, 3)), vision=QwenVisionConfig(window_size=56),
                          video_token_id=VIDEO_ID)
    for cfg, size, frames_kept in ((llava, 32, 3), (qwen, 56, 2)):  # Qwen: a multiple of its 2-frame temporal patch
        frames = torch.arange(8.0)[:, None, None, None].expand(8, 3, size, size)  # frame k holds the value k
        n = video_token_count(cfg, frames)
        ids = torch.cat([torch.tensor([9]), torch.full((n,), VIDEO_ID), torch.tensor([10, 11])])
        prompt = RLPrompt(videos=(frames,), prompt_ids=ids, ground_truth=None, content_ids=("c",), sample_id="s")
        view = rollout_view(prompt, cfg, 3)
        assert view.videos[0][:, 0, 0, 0].tolist() == ([1.0, 4.0, 6.0] if frames_kept == 3 else [2.0, 6.0])
        m = video_token_count(cfg, view.videos[0])
        assert m < n and torch.equal(view.prompt_ids, torch.cat([torch.tensor([9]), torch.full((m,), VIDEO_ID),
                                                                 torch.tensor([10, 11])]))
        assert view.content_ids == (f"c@rollout{frames_kept}of8",) and view.ground_truth is prompt.ground_truth
        assert abs(view.seconds_per_frame[0] - ROLLOUT_SECONDS_PER_FRAME * 8 / frames_kept) < 1e-12
        assert rollout_view(prompt, cfg, 8) is prompt
        # two videos (and an image) in one prompt: each long video's run shrinks on its own, the others stay
        image = torch.full((1, 3, size, size), 9.0)
        k = video_token_count(cfg, image)
        two = torch.cat([torch.tensor([9]), torch.full((k,), VIDEO_ID), torch.tensor([12]), torch.full((n,), VIDEO_ID),
                         torch.tensor([13]), torch.full((n,), VIDEO_ID), torch.tensor([10, 11])])
        multi = RLPrompt(videos=(image, frames, frames + 10), prompt_ids=two, ground_truth=None,
                         content_ids=("i", "c", "d"), sample_id="m")
        mview = rollout_view(multi, cfg, 3)
        assert [v.shape[0] for v in mview.videos] == [1, frames_kept, frames_kept] and mview.videos[0] is image
        assert torch.equal(mview.videos[2], view.videos[0] + 10)
        assert torch.equal(mview.prompt_ids, torch.cat([torch.tensor([9]), torch.full((k,), VIDEO_ID), torch.tensor([12]),
                                                        torch.full((m,), VIDEO_ID), torch.tensor([13]),
                                                        torch.full((m,), VIDEO_ID), torch.tensor([10, 11])]))
        assert mview.content_ids == ("i", f"c@rollout{frames_kept}of8", f"d@rollout{frames_kept}of8")
        assert mview.seconds_per_frame[0] is None and mview.seconds_per_frame[1] == view.seconds_per_frame[0]
        with pytest.raises(ValueError, match=r"prompt 's': expected one run of video tokens per visual input"):
            rollout_view(RLPrompt(videos=(frames,), prompt_ids=ids[:-4], ground_truth=None, content_ids=("c",), sample_id="s"),
                         cfg, 3)
