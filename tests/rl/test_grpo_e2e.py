"""End to end: two GRPO steps on 2 gloo ranks (CP=2, shared-prefix packing; or CP=2 unpacked with each
group split into micro-batches of 3 and 1 responses) equal world=1 unpacked whole groups, for both model
families (LLaVA-OneVision's SigLIP + Qwen2; Qwen2.5-VL with its window tower, multimodal RoPE and its
rollout engine).

Same seeds give the same rollouts (an HF engine, or the ``megatron`` engine on the policy itself, on every
rank, each drawing its share of the step's responses, at CP=2; one HF engine drawing all at world=1); then
the old-policy
and reference passes, the GRPO loss with KL and the optimizer steps must give the same losses and
the same updated weights.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist import init_cpu_dist, run_ranks

VOCAB_TEXTS = ["what colour is the shape in the video", "the shape is red green blue yellow",
               "answer with the letter of the option", "a b c d options shown in frames"] * 20


def text_length_reward(inp) -> float:
    """A user reward loaded by 'module:function': decoded length (varies across random rollouts)."""
    return len(inp.response) / 10.0


def _family(family, tok):
    """(config, builder, frame size, tokens of a video of T frames) of the tiny model of ``family``."""
    from megatron_longvideo.models.llm import LLMConfig

    vocab = 304  # padded past the tokenizer's 300 like a TP-divisible vocabulary
    if family == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig, build_qwen25vl
        from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

        cfg = Qwen25VLConfig(llm=LLMConfig(vocab_size=vocab, init_std=0.1, mrope_section=(2, 3, 3)),
                             vision=QwenVisionConfig(window_size=56, freeze=True), video_token_id=tok.video_id)
        return cfg, build_qwen25vl, 56, lambda t: cfg.num_video_tokens(t, 56, 56)
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig
    from megatron_longvideo.models.llava_onevision.model import VLMConfig, build_vlm

    cfg = VLMConfig(llm=LLMConfig.tiny(vocab_size=vocab, init_std=0.1), vision=VisionConfig(freeze=True, freeze_projector=True),
                    video_token_id=tok.video_id)
    return cfg, build_vlm, 32, cfg.vision.num_video_tokens


def _setup(tok_path, cp, pack, split=None, family="llava_onevision", tis=None, view=None, kind="hf", algo=None,
           spacing=None):
    from megatron_longvideo.data.tokenizer import load_tokenizer
    from megatron_longvideo.models.video_cache import content_id_of_frames
    from megatron_longvideo.parallel.groups import ParallelConfig, initialize_parallel
    from megatron_longvideo.rl.engines import build_engine
    from megatron_longvideo.rl.engines.base import SamplingConfig
    from megatron_longvideo.rl.losses import GRPOLossConfig
    from megatron_longvideo.rl.rewards import GroundTruth
    from megatron_longvideo.rl.rollout import RLPrompt
    from megatron_longvideo.rl.trainer import GRPOConfig, GRPOTrainer
    from megatron_longvideo.training.engine import OptimConfig, build_optimizer, wrap_ddp

    tok = load_tokenizer(tok_path)
    groups = initialize_parallel(ParallelConfig(context_parallel_size=cp), seed=7)
    cfg, build, size, video_tokens = _family(family, tok)
    torch.manual_seed(7)
    policy = build(cfg, groups)
    torch.manual_seed(7)
    reference = build(cfg, groups)
    reference.requires_grad_(False)
    ddp = wrap_ddp(policy, groups)
    optimizer = build_optimizer([ddp], OptimConfig(lr=1e-2, adam_eps=1e-3, clip_grad=1.0))
    g = torch.Generator().manual_seed(1)
    prompts = []
    for i in range(4):
        frames = torch.randn(2 + i % 2, 3, size, size, generator=g)
        n = video_tokens(frames.shape[0])
        ids = torch.cat([torch.tensor([tok.im_start_id]), torch.full((n,), tok.video_id),
                         torch.tensor(tok.encode("what colour is the shape")), torch.tensor([tok.im_end_id])])
        prompts.append(RLPrompt(videos=(frames,), prompt_ids=ids, ground_truth=GroundTruth(answer="A", options=("red", "blue")),
                                content_ids=(content_id_of_frames(frames),), sample_id=f"p{i}",
                                seconds_per_frame=None if spacing is None else (spacing,)))
    grpo = GRPOConfig(
        group_size=4, prompts_per_step=2, pack=pack, responses_per_microbatch=split,
        sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, seed=11),
        loss=GRPOLossConfig(kl_beta=0.05, clip_eps_high=0.28, tis_cap=None if tis is None else tis["cap"]),
        rollout_max_frames=view,
        rewards=((f"{__name__}:text_length_reward", 1.0), ("format", 0.1)),
        update_epochs=2, groups_per_microbatch=1, log_samples_every=0,
    )
    if algo:  # another policy loss / advantage estimator / reward shaping
        import dataclasses

        grpo = dataclasses.replace(grpo, loss=dataclasses.replace(grpo.loss, **algo.get("loss", {})),
                                   **{k: v for k, v in algo.items() if k != "loss"})
    if kind == "megatron":  # generation on the policy itself
        engine = build_engine("megatron", cfg, policy=ddp, groups=groups, tokenizer=tok, pad_token_id=tok.pad_id)
    else:
        engine = build_engine("hf", cfg, tokenizer=tok, pad_token_id=tok.pad_id)  # on every rank: each draws its share
    if tis is not None and engine is not None:  # an engine whose log-probs sit tis["shift"] below the policy's
        import dataclasses

        generate = engine.generate

        def shifted(*args, **kwargs):
            return [[dataclasses.replace(c, logprobs=tuple(x - tis["shift"] for x in c.logprobs)) for c in group]
                    for group in generate(*args, **kwargs)]

        engine.generate = shifted
    if view is not None:  # record what the engine is given
        inner, engine.seen = engine.generate, []

        def recorded(prompt_embeds, *args, **kwargs):
            engine.seen.extend(int(e.shape[0]) for e in prompt_embeds)
            return inner(prompt_embeds, *args, **kwargs)

        engine.generate = recorded
    trainer = GRPOTrainer(grpo, policy=ddp, optimizer=optimizer, groups=groups, tokenizer=tok, engine=engine,
                          reference=reference, log=lambda s: None)
    return trainer, prompts, ddp, groups


def _worker(rank, world_size, tok_path, pack, split=None, family="llava_onevision", tis=None, view=None, kind="hf",
            algo=None, spacing=None):
    init_cpu_dist()
    from megatron_longvideo.checkpoint.full_state import gather_full_state
    from megatron_longvideo.models.llm import unwrap
    from megatron_longvideo.parallel.groups import destroy_parallel

    trainer, prompts, ddp, groups = _setup(tok_path, world_size, pack, split, family, tis, view, kind, algo, spacing)
    queue = list(prompts)
    draw = lambda k: [queue.pop(0) for _ in range(k)]  # noqa: E731
    losses, rewards = [], []
    for _ in range(2):
        metrics = trainer.step(draw)
        losses.append(metrics["train/loss"])
        rewards.append(metrics["reward/mean"])
    weights = gather_full_state(ddp, groups)
    out = {"losses": losses, "rewards": rewards, "weights": weights, "metrics": metrics}
    if spacing is not None:  # whether the prompts' spacing moves their multimodal positions at all
        policy = unwrap(ddp)
        default = [dataclasses.replace(p, seconds_per_frame=None) for p in prompts]
        out["spacing_moves_positions"] = any(not torch.equal(a, b) for a, b in zip(policy.rollout_positions(prompts),
                                                                                   policy.rollout_positions(default)))
    if view is not None:  # what the engine was given, and the prompts with one frame's video tokens (LLaVA-OneVision)
        count = unwrap(ddp).cfg.vision.num_video_tokens
        out.update(seen=trainer.engine.seen, full_lengths=[len(p.prompt_ids) for p in prompts],
                   view_lengths=[len(p.prompt_ids) - count(p.videos[0].shape[0]) + count(view) for p in prompts])
    destroy_parallel()
    return out


def _assert_same_runs(got, ref):
    """Every run in ``got`` drew the reference run's rollouts and ended with its losses and weights (fp32)."""
    for r in got:
        assert r["rewards"] == ref["rewards"], "rollouts differ: the engines did not sample the same responses"
        for a, b in zip(r["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-5 * max(abs(b), 1e-3), (r["losses"], ref["losses"])
        for k, w in ref["weights"].items():
            err = ((r["weights"][k] - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
            assert err <= 1e-5, f"{k}: updated weights differ by {err:.2e} (relative)"


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_two_grpo_steps_cp2_packed_equal_world1_unpacked(tmp_path, family):
    from megatron_longvideo.data.tokenizer import train_sentencepiece

    tok_path = train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300)
    ref = run_ranks(_worker, 1, tok_path, False, None, family)[0]
    got = run_ranks(_worker, 2, tok_path, True, None, family)
    if family == "llava_onevision":  # and with each group split into micro-batches of 3 + 1 responses, unpacked
        got += run_ranks(_worker, 2, tok_path, False, 3)
    # and with the rollouts drawn by the policy itself (the megatron engine, no weight sync)
    got += run_ranks(_worker, 2, tok_path, True, None, family, None, None, "megatron")
    _assert_same_runs(got, ref)
    m = ref["metrics"]
    assert m["train/loss"] != 0.0 and m["train/kl_ref"] >= 0.0 and m["reward/std"] > 0
    assert m["time/encode"] > 0, "the step encoded new videos"
    assert m["cache/hits_this_step"] > 0, "the old-policy, reference and update passes should reuse the cached video"
    # the weights moved: the comparison is not between two untouched models
    assert any(m[k] > 0 for k in ("train/grad_norm",))


ALGORITHMS = {
    "gspo+reinforce_pp+overlong": {"loss": {"policy_loss": "gspo", "clip_eps_low": 3e-4, "clip_eps_high": 4e-4,
                                            "kl_importance_weight": True, "aggregation": "seq_mean"},
                                   "advantage_estimator": "reinforce_pp", "overlong_buffer": 3},
    "cispo+rloo": {"loss": {"policy_loss": "cispo", "clip_eps_low": 1.0, "clip_eps_high": 0.28},
                   "advantage_estimator": "rloo"},
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_other_algorithms_at_cp2_packed_equal_world1_unpacked(tmp_path, name):
    """GSPO's sequence ratio summed over the CP ranks, REINFORCE++'s batch statistics, CISPO and RLOO, the
    overlong shaping and the importance-weighted KL: two steps at CP=2 packed equal world=1 unpacked."""
    from megatron_longvideo.data.tokenizer import train_sentencepiece

    tok_path = train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300)
    algo = ALGORITHMS[name]
    ref = run_ranks(_worker, 1, tok_path, False, None, "llava_onevision", None, None, "hf", algo)[0]
    got = run_ranks(_worker, 2, tok_path, True, None, "llava_onevision", None, None, "hf", algo)
    _assert_same_runs(got, ref)
    m = ref["metrics"]
    assert m["train/loss"] != 0.0 and m["train/grad_norm"] > 0
    if "overlong_buffer" in algo:
        assert "reward/overlong" in m and m["reward/overlong"] < 0, m  # 6-token responses, the limit 6, buffer 3


def test_truncated_importance_sampling_and_logprob_diff_at_cp2_packed_equal_world1(tmp_path):
    """Engine log-probs 0.5 below the policy's (the policy's own engine, shifted): every sampled token has
    |engine - trainer| = 0.5 (up to the engine's ~1e-6 disagreement) and a trainer-old / engine ratio of
    e^0.5 = 1.65, truncated at the cap 1.5. CP=2 packed equals world=1 unpacked with the correction on."""
    import math

    from megatron_longvideo.data.tokenizer import train_sentencepiece

    tok_path = train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300)
    tis = {"cap": 1.5, "shift": 0.5}
    ref = run_ranks(_worker, 1, tok_path, False, None, "llava_onevision", tis)[0]
    got = run_ranks(_worker, 2, tok_path, True, None, "llava_onevision", tis)
    assert math.exp(0.5) > 1.5
    for r in [ref] + got:
        m = r["metrics"]
        assert abs(m["rollout/logprob_diff_mean"] - 0.5) < 1e-4 and abs(m["rollout/logprob_diff_max"] - 0.5) < 1e-4, m
        assert abs(m["train/tis_weight_mean"] - 1.5) < 1e-6 and m["train/tis_clip_frac"] == 1.0, m
    for r in got:
        assert r["rewards"] == ref["rewards"]
        for a, b in zip(r["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-5 * max(abs(b), 1e-3), (r["losses"], ref["losses"])


def test_training_passes_use_the_prompts_frame_spacing(tmp_path):
    """Qwen2.5-VL prompts whose frames are 2 s apart (``RLPrompt.seconds_per_frame``): the old-policy pass puts
    their video tokens where the rollouts did, so the engine's log-probs of the drawn tokens equal the trainer's
    (the policy's own weights, no shift; they used to be scored at the default 0.5 s spacing), and the spacing
    does move the positions (a 3-frame video has a second temporal patch)."""
    from megatron_longvideo.data.tokenizer import train_sentencepiece

    tok_path = train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300)
    out = run_ranks(_worker, 1, tok_path, False, None, "qwen2_5_vl", {"cap": 2.0, "shift": 0.0}, None, "hf", None, 2.0)[0]
    assert out["spacing_moves_positions"], "vacuous: 2 s spacing gives the default positions"
    m = out["metrics"]
    assert m["rollout/logprob_diff_max"] < 1e-4, m


def test_rollouts_on_fewer_frames_than_training_at_cp2_packed_equal_world1(tmp_path):
    """``rollout_max_frames=1``: the engine is given prompts with one frame's video tokens while the passes
    train on all 2-3 frames; the engine's log-probs then differ from the trainer's, TIS weighs the loss, and
    CP=2 packed (every rank drawing its share of the one-frame rollouts) equals world=1 unpacked."""
    from megatron_longvideo.data.tokenizer import train_sentencepiece

    tok_path = train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300)
    tis = {"cap": 2.0, "shift": 0.0}
    ref = run_ranks(_worker, 1, tok_path, False, None, "llava_onevision", tis, 1)[0]
    got = run_ranks(_worker, 2, tok_path, True, None, "llava_onevision", tis, 1)
    assert sorted(ref["seen"]) == sorted(ref["view_lengths"]), (ref["seen"], ref["view_lengths"])
    assert all(v < f for v, f in zip(ref["view_lengths"], ref["full_lengths"])), "2-3 frame prompts: a shorter view"
    assert sorted(got[0]["seen"] + got[1]["seen"]) == sorted(ref["seen"]), "the ranks must share the rollouts"
    m = ref["metrics"]
    assert m["rollout/logprob_diff_mean"] > 1e-3, "a one-frame view must change the engine's log-probs"
    assert 0 < m["train/tis_weight_mean"] <= 2.0
    for r in got:
        assert r["rewards"] == ref["rewards"]
        for a, b in zip(r["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-5 * max(abs(b), 1e-3), (r["losses"], ref["losses"])
        assert abs(r["metrics"]["rollout/logprob_diff_mean"] - m["rollout/logprob_diff_mean"]) < 1e-5


def _dynamic_worker(rank, world_size, tok_path):
    init_cpu_dist()
    import dataclasses

    from megatron_longvideo.parallel.groups import destroy_parallel

    trainer, prompts, ddp, groups = _setup(tok_path, world_size, True)
    # a reward that is the same for every response: every group is dropped, refills run out, and the
    # step still trains on the last round (zero advantages) instead of stalling
    trainer.cfg = dataclasses.replace(trainer.cfg, dynamic_sampling=True, max_refill_rounds=2,
                                      rewards=(("format", 1.0),))
    trainer.reward_spec = dict(trainer.cfg.rewards)
    drawn = []

    def draw(k):
        drawn.append(k)
        return [prompts[(len(drawn) + i) % len(prompts)] for i in range(k)]

    metrics = trainer.step(draw)
    destroy_parallel()
    return drawn, metrics


def test_dynamic_sampling_refills_then_trains_on_what_it_has(tmp_path):
    from megatron_longvideo.data.tokenizer import train_sentencepiece

    tok_path = train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300)
    drawn, metrics = run_ranks(_dynamic_worker, 1, tok_path)[0]
    assert drawn == [2, 2], "two rounds of two prompts: every group had equal rewards"
    assert metrics["sampling/groups_dropped"] == 4.0 and metrics["sampling/refill_rounds"] == 2.0
    assert metrics["reward/std"] == 0.0 and metrics["train/skipped"] == 0.0


def signal_or_flat_reward(inp) -> float:
    """A user reward: constant for a prompt whose answer is 'FLAT' (its group is dropped), else a number that
    differs between different texts."""
    return 0.5 if inp.answer == "FLAT" else sum(map(ord, inp.response)) % 97 / 97.0


def _replicas_worker(rank, world_size, tok_path):
    init_cpu_dist()
    import dataclasses

    from megatron_longvideo.parallel.groups import destroy_parallel
    from megatron_longvideo.rl.rewards import GroundTruth

    trainer, prompts, ddp, groups = _setup(tok_path, 1, True)  # CP=1 on 2 ranks: two data-parallel replicas
    assert groups.dp_size == 2
    trainer.cfg = dataclasses.replace(trainer.cfg, dynamic_sampling=True, max_refill_rounds=1, num_minibatches=2,
                                      update_epochs=1, rewards=((f"{__name__}:signal_or_flat_reward", 1.0),))
    trainer.reward_spec = dict(trainer.cfg.rewards)
    flat = GroundTruth(answer="FLAT", problem_type="free_form")
    # replica 0: one group with signal and one without; replica 1: none with signal. Unagreed, replica 0
    # would train on 1 group (one minibatch, one optimizer step), replica 1 on 2 (two): a hang.
    mine = [prompts[0], dataclasses.replace(prompts[1], ground_truth=flat)] if rank == 0 else \
        [dataclasses.replace(p, ground_truth=flat) for p in prompts[2:4]]
    updates = []
    step = trainer.optimizer.step

    def counted_step(*args, **kwargs):
        updates.append(1)
        return step(*args, **kwargs)

    trainer.optimizer.step = counted_step
    metrics = trainer.step(lambda k: mine[:k])
    destroy_parallel()
    return {"updates": len(updates), "filled": metrics["sampling/groups_filled"],
            "dropped": metrics["sampling/groups_dropped"]}


def test_data_parallel_replicas_take_the_same_optimizer_steps_with_dynamic_sampling(tmp_path):
    from megatron_longvideo.data.tokenizer import train_sentencepiece

    tok_path = train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300)
    results = run_ranks(_replicas_worker, 2, tok_path, timeout=180)  # unagreed, the ranks hang
    assert results[0]["updates"] == results[1]["updates"] == 1, results  # one kept group -> one minibatch each
    assert results[0]["filled"] == 0.0 and results[0]["dropped"] == 1.0, results
    assert results[1]["filled"] == 1.0 and results[1]["dropped"] == 2.0, results  # filled with a dropped group


def failing_reward(inp) -> float:
    """A user reward that breaks on one prompt's responses (answer 'BAD') and hangs on another's ('SLOW')."""
    if inp.answer == "BAD":
        raise KeyError("no such field")
    if inp.answer == "SLOW":
        import time

        time.sleep(3.0)
    return sum(map(ord, inp.response)) % 97 / 97.0


def _failing_reward_worker(rank, world_size, tok_path):
    init_cpu_dist()
    import dataclasses

    from megatron_longvideo.parallel.groups import destroy_parallel
    from megatron_longvideo.rl.rewards import GroundTruth

    trainer, prompts, ddp, groups = _setup(tok_path, world_size, True)
    trainer.cfg = dataclasses.replace(trainer.cfg, prompts_per_step=3, num_minibatches=1, update_epochs=1,
                                      reward_time_limit_s=0.2, rewards=((f"{__name__}:failing_reward", 1.0),))
    trainer.reward_spec = dict(trainer.cfg.rewards)
    mine = [dataclasses.replace(prompts[0], ground_truth=GroundTruth(answer="BAD", problem_type="free_form")),
            prompts[1], dataclasses.replace(prompts[2], ground_truth=GroundTruth(answer="SLOW", problem_type="free_form"))]
    metrics = trainer.step(lambda k: mine[:k])
    report = trainer.reward_report
    destroy_parallel()
    return {"failed": metrics["reward/failed_groups"], "counts": report.counts(), "example": report.examples,
            "loss": metrics["train/loss"], "grad_norm": metrics["train/grad_norm"]}


def test_a_reward_that_raises_or_hangs_leaves_its_group_out_and_is_counted(tmp_path):
    from megatron_longvideo.data.tokenizer import train_sentencepiece

    tok_path = train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300)
    r = run_ranks(_failing_reward_worker, 1, tok_path)[0]
    assert r["failed"] == 2.0, r  # the BAD and the SLOW group; the third trains
    assert r["counts"] == {"reward: error": 4, "reward: timeout": 4}, r
    assert "on record 'p0'" in r["example"]["reward: error"] and "KeyError" in r["example"]["reward: error"]
    assert "on record 'p2'" in r["example"]["reward: timeout"]
    assert r["grad_norm"] > 0, "the group that could be scored still trains"


def _nan_worker(rank, world_size, tok_path):
    init_cpu_dist()
    import warnings

    from megatron_longvideo.checkpoint.full_state import gather_full_state
    from megatron_longvideo.parallel.groups import destroy_parallel

    trainer, prompts, ddp, groups = _setup(tok_path, world_size, True)
    make = trainer._loss_fn

    def poisoned(*args, **kwargs):  # a loss that turns non-finite, as a numerical blow-up would
        inner = make(*args, **kwargs)

        def loss_fn(logp, entropy, plan):
            loss, count, report = inner(logp, entropy, plan)
            report["loss_sums"] = report["loss_sums"] * float("nan")
            return loss * float("nan"), count, report

        return loss_fn

    trainer._loss_fn = poisoned
    before = gather_full_state(ddp, groups)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = trainer.step(lambda k: prompts[:k])
    after = gather_full_state(ddp, groups)
    destroy_parallel()
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    return metrics["train/skipped"], unchanged, [str(w.message) for w in caught if "non-finite loss" in str(w.message)]


def test_non_finite_loss_skips_the_update(tmp_path):
    from megatron_longvideo.data.tokenizer import train_sentencepiece

    tok_path = train_sentencepiece(VOCAB_TEXTS, str(tmp_path / "tok"), vocab_size=300)
    skipped, unchanged, warned = run_ranks(_nan_worker, 1, tok_path)[0]
    assert skipped == 1.0 and unchanged and warned
