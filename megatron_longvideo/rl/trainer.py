"""The GRPO trainer: one step = rollouts, rewards, log-prob passes, and the policy update.

    prompts ──encode once (cache)──▶ prompt embeddings ──engine──▶ G responses per prompt
            ──rewards──▶ group advantages (groups without signal dropped, refilled: DAPO)
            ──prefill (CP shards, shared-prefix packing)──▶ old-policy and reference log-probs
            ──prefill + GRPO loss──▶ megatron DDP backward ──▶ optimizer step (clip; NaN skips)

The policy is a DDP-wrapped :class:`~megatron_longvideo.models.vlm.VideoLanguageModel`; the reference
is a frozen copy (optionally offloaded to CPU between passes). Every rank of a data-parallel replica
(TP x CP) runs the same step on the same prompts; the rollouts are divided among the replica's ranks
that hold an engine (:func:`~megatron_longvideo.rl.rollout.agree_rollout_split`).
Pipeline parallelism is not supported by the trainer yet (PP must be 1).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_longvideo.checkpoint.full_state import iter_full_state_items
from megatron_longvideo.models.encode import encode_stats
from megatron_longvideo.models.llm import unwrap
from megatron_longvideo.models.prefill import prefill_step
from megatron_longvideo.models.video_cache import VideoEmbeddingCache, cache_key, weights_version
from megatron_longvideo.parallel.groups import ParallelGroups
from megatron_longvideo.platform.device import compute_device
from megatron_longvideo.rl.advantages import ESTIMATORS as ADVANTAGE_ESTIMATORS
from megatron_longvideo.rl.advantages import batch_moments, batch_normalize, compute_advantages, overlong_penalty
from megatron_longvideo.rl.engines.base import SamplingConfig
from megatron_longvideo.rl.losses import GRPOLossConfig, grpo_loss, logprob_diff, needs_reference, sequence_log_ratio_sum
from megatron_longvideo.rl.packing import build_prefill_batch
from megatron_longvideo.data.errors import SkipReport
from megatron_longvideo.rl.rewards import compute_rewards
from megatron_longvideo.rl.engines.decode import mix_seed
from megatron_longvideo.rl.rollout import (RLPrompt, agree_rollout_split, generate_groups, nonempty, prompt_embeddings,
                                           prompt_videos, rollout_view, video_prompts)
from megatron_longvideo.rl.sampling import DynamicSampler, DynamicSamplingConfig
from megatron_longvideo.training.engine import forward_backward

__all__ = ["GRPOConfig", "GRPOTrainer", "Rollouts"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """What one GRPO step does."""

    group_size: int = 8
    """Responses per prompt (G)."""
    prompts_per_step: int = 2
    """Prompts (groups) per step on each data-parallel replica."""
    sampling: SamplingConfig = dataclasses.field(default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=1.0))
    """Rollout sampling (``n`` is set to ``group_size``)."""
    loss: GRPOLossConfig = dataclasses.field(default_factory=GRPOLossConfig)
    """Clipped surrogate, KL and aggregation."""
    advantage_scale: str = "std"
    """'std' (GRPO: divide by the group's std) or 'none' (Dr.GRPO); ``advantage_estimator`` overrides it."""
    advantage_estimator: Optional[str] = None
    """:func:`~megatron_longvideo.rl.advantages.compute_advantages`'s estimator: "grpo", "dr_grpo", "rloo" or
    "reinforce_pp" (group baseline, then normalised over the step's whole batch, all replicas); None: from
    ``advantage_scale``."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: responses longer than ``max_new_tokens - overlong_buffer`` tokens
    lose up to ``overlong_penalty`` reward, linearly to the limit (0: off)."""
    overlong_penalty: float = 1.0
    """The punishment at the length limit (and beyond)."""
    reward_time_limit_s: Optional[float] = 30.0
    """A user reward (``module:function``) call taking longer is abandoned and its group left out of the
    update, counted (built-in rewards are bounded by construction). None: no limit."""
    rewards: tuple[tuple[str, float], ...] = (("accuracy", 1.0), ("format", 0.1))
    """(reward name or 'module:function', weight) pairs; the total is their weighted sum."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal and draw more prompts to refill (DAPO)."""
    max_refill_rounds: int = 3
    """Generation rounds per step with dynamic sampling (the first included)."""
    num_minibatches: int = 1
    """Optimizer steps per GRPO step (the groups are split into this many mini-batches)."""
    update_epochs: int = 1
    """Passes over the step's groups (PPO epochs)."""
    groups_per_microbatch: int = 1
    """Groups per micro-batch of the prefill and update passes."""
    responses_per_microbatch: Optional[int] = None
    """Split each group into micro-batches of this many responses (packed: the prefix and these
    responses in one row; unpacked: this many rows), bounding activation memory per micro-batch.
    None: whole groups, ``groups_per_microbatch`` of them."""
    pack: bool = True
    """Shared-prefix packing of each group's responses (off: G separate sequences)."""
    offload_reference: bool = False
    """Keep the reference model in CPU memory between its passes (GPU runs)."""
    log_samples_every: int = 10
    """Print/log one sample rollout every this many steps (0: never)."""
    sync_bucket_mb: float = 256.0
    """Weight sync to the engine in buckets of this many MB of full tensors, in the training dtype, gathered
    from the TP shards one bucket at a time (:func:`~megatron_longvideo.checkpoint.full_state.iter_full_state_buckets`)."""
    rollout_max_frames: Optional[int] = None
    """Rollouts see each video at most this many frames (taken uniformly, :func:`~megatron_longvideo.rl.rollout.rollout_view`);
    the old-policy, reference and update passes see all of them. The rollouts then sample from another
    distribution than the one trained, which TIS corrects: needs ``loss.tis_cap``. None: all frames."""
    engine_logprobs: bool = False
    """Have the engine return its log-probs of the sampled tokens and report how far they are from the
    trainer's (``rollout/logprob_diff_mean`` / ``_max``); implied by ``loss.tis_cap``, which needs them."""

    def __post_init__(self):
        if self.group_size < 2 and self.advantage_scale == "std":
            raise ValueError(f"group_size: GRPO needs at least 2 responses per prompt, got {self.group_size}")
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step: must be >= 1, got {self.prompts_per_step}")
        if self.advantage_scale not in ("std", "none"):
            raise ValueError(f"advantage_scale: must be 'std' or 'none', got {self.advantage_scale!r}")
        if self.advantage_estimator is None:
            object.__setattr__(self, "advantage_estimator", "grpo" if self.advantage_scale == "std" else "dr_grpo")
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_estimator: {self.advantage_estimator!r} is not one of {ADVANTAGE_ESTIMATORS}")
        if self.advantage_estimator in ("grpo", "rloo") and self.group_size < 2:
            raise ValueError(f"group_size: {self.advantage_estimator} needs at least 2 responses per prompt")
        if not 0 <= self.overlong_buffer <= self.sampling.max_new_tokens:
            raise ValueError(f"overlong_buffer: must be in [0, max_new_tokens={self.sampling.max_new_tokens}], "
                             f"got {self.overlong_buffer}")
        if not 0.0 <= self.overlong_penalty < math.inf:
            raise ValueError(f"overlong_penalty: must be finite and >= 0, got {self.overlong_penalty}")
        if not self.rewards:
            raise ValueError("rewards: at least one reward is required")
        if self.num_minibatches < 1 or self.prompts_per_step % self.num_minibatches:
            raise ValueError(f"num_minibatches: must be >= 1 and divide prompts_per_step={self.prompts_per_step}")
        if self.update_epochs < 1:
            raise ValueError(f"update_epochs: must be >= 1, got {self.update_epochs}")
        if self.groups_per_microbatch < 1:
            raise ValueError(f"groups_per_microbatch: must be >= 1, got {self.groups_per_microbatch}")
        if self.responses_per_microbatch is not None and self.responses_per_microbatch < 1:
            raise ValueError(f"responses_per_microbatch: must be >= 1 or None, got {self.responses_per_microbatch}")
        if not self.sync_bucket_mb > 0:
            raise ValueError(f"sync_bucket_mb: must be positive, got {self.sync_bucket_mb}")
        if self.rollout_max_frames is not None:
            if self.rollout_max_frames < 1:
                raise ValueError(f"rollout_max_frames: must be >= 1 or None, got {self.rollout_max_frames}")
            if self.loss.tis_cap is None:
                raise ValueError("rollout_max_frames: rollouts on fewer frames sample from another distribution than "
                                 "the one trained; set loss.tis_cap (--tis-cap, e.g. 2) so the loss corrects for it")
        logprobs = self.sampling.logprobs or self.engine_logprobs or self.loss.tis_cap is not None
        object.__setattr__(self, "sampling", dataclasses.replace(self.sampling, n=self.group_size, logprobs=logprobs))


@dataclasses.dataclass
class Rollouts:
    """The scored groups of one step."""

    prompts: list[RLPrompt]
    responses: list[list[list[int]]]
    rewards: torch.Tensor
    """``[groups, G]`` total rewards."""
    parts: dict[str, torch.Tensor]
    """Unweighted reward parts ``{name: [groups, G]}``."""
    advantages: torch.Tensor
    """``[groups, G]``."""
    generated_rewards: Optional[torch.Tensor] = None
    """``[all groups generated this step, G]`` total rewards before dynamic sampling dropped any
    (what the reward metrics report: the kept groups are biased towards mixed rewards)."""
    generated_parts: Optional[dict] = None
    """Reward parts of all generated groups."""
    engine_logprobs: Optional[list] = None
    """``[group][response]`` the engine's log-probs of the response tokens (lists of floats; None for a
    response it gave none for), when the sampling asked for them."""
    failed_groups: int = 0
    """Groups left out because a reward could not score one of their responses (their rewards and
    advantages are zero: they train nothing and, under dynamic sampling, are dropped)."""

    def __post_init__(self):
        if self.generated_rewards is None:
            self.generated_rewards, self.generated_parts = self.rewards, self.parts


class GRPOTrainer:
    """Runs GRPO steps on a DDP-wrapped policy (see module docstring)."""

    def __init__(
        self,
        cfg: GRPOConfig,
        *,
        policy,
        optimizer,
        groups: ParallelGroups,
        tokenizer,
        engine=None,
        reference=None,
        scheduler=None,
        cache: Optional[VideoEmbeddingCache] = None,
        writer=None,
        log: Callable[[str], None] = print,
    ):
        if groups.config.pipeline_parallel_size != 1:
            raise ValueError("the GRPO trainer needs pipeline_parallel_size=1 (pipeline rollouts are not supported yet)")
        if needs_reference(cfg.loss) and reference is None:
            raise ValueError("loss.kl_beta > 0 needs a reference model")
        self.cfg, self.policy, self.optimizer, self.groups = cfg, policy, optimizer, groups
        self.tokenizer, self.engine, self.reference, self.scheduler = tokenizer, engine, reference, scheduler
        self.cache = cache if cache is not None else VideoEmbeddingCache()
        self.writer, self.log = writer, log
        self.step_count = 0
        self.device = compute_device()
        """Where the passes compute; rewards and advantages are scored on the host and moved here."""
        self.pad_id = tokenizer.pad_id
        self.reward_spec = dict(cfg.rewards)
        self.reward_report = SkipReport(log=self.log if dist.get_rank() == 0 else None)
        """Responses a reward could not score, by reason (``reward: timeout``, ``ground truth: ...``)."""
        self._versions: dict[int, str] = {}
        self._round = 0
        """Generation rounds so far in this step (dynamic sampling draws several): part of the seeds."""
        # who draws which responses, and whether the engine takes VideoPrompts: every rank must build the
        # same rollout inputs (their collectives), so the replica agrees once, at start
        self.split = agree_rollout_split(groups, engine)
        self._engine_takes_videos = self.split.takes_video_prompts

    # ------------------------------------------------------------------------------------------ #
    def sync_weights(self) -> None:
        """The policy's language-model weights to the engines that hold a copy, streamed in buckets
        (``sync_bucket_mb``); every rank of the replica takes part in the gather, engine or not."""
        if not self.split.needs_weights:  # no copies: the engines run on the policy itself (or there are none)
            return
        items = iter_full_state_items(self.policy, self.groups, bucket_bytes=int(self.cfg.sync_bucket_mb * 2**20),
                                      select=lambda n: not n.startswith("vision."))
        if self.engine is not None and getattr(self.engine, "needs_weight_sync", True):
            self.engine.sync_weights(items)
        for _ in items:  # what the engine left, and the ranks without one: the gather is a collective
            pass

    def _keys(self, prompts: Sequence[RLPrompt], model) -> list[list[str]]:
        """Per prompt, the cache keys of its visual inputs for ``model``'s vision weights (fingerprinted once a
        step)."""
        if id(model) not in self._versions:
            self._versions[id(model)] = weights_version(unwrap(model).vision)
        version = self._versions[id(model)]
        return [[cache_key(c, {"frames": tuple(v.shape)}, version) for c, v in zip(p.content_ids, p.videos)]
                for p in prompts]

    def rollout(self, prompts: Sequence[RLPrompt]) -> Rollouts:
        """Generate G responses per prompt with the current policy and score them."""
        if not self.cfg.sampling.logprobs:
            return self.score(prompts, self.generate(prompts))
        token_groups, logprobs = self.generate(prompts, with_logprobs=True)
        ro = self.score(prompts, token_groups)
        ro.engine_logprobs = logprobs
        return ro

    def generate(self, prompts: Sequence[RLPrompt], *, with_logprobs: bool = False):
        """G sampled responses (token ids, ``[prompt][response]``) per prompt, on every rank of the replica;
        ``with_logprobs``: and the engine's log-probs of each response's tokens (None where a response was
        empty and got the eos fallback token, or the engine gave none)."""
        cfg = self.cfg
        sampling = cfg.sampling
        if sampling.seed is not None:  # the base seed of this replica, step and round (each response: its own)
            sampling = dataclasses.replace(sampling, seed=mix_seed(sampling.seed, self.groups.dp_rank, self.step_count, self._round))
        self._round += 1
        if cfg.rollout_max_frames is not None:  # the rollouts' view of each video: fewer frames
            prompts = [rollout_view(p, unwrap(self.policy).cfg, cfg.rollout_max_frames) for p in prompts]
        keys = self._keys(prompts, self.policy)
        if self._engine_takes_videos:  # token ids and the cached videos: the engine merges and positions them
            with torch.no_grad():
                videos = prompt_videos(self.policy, self.groups, prompts, cache=self.cache, cache_keys=keys)
            inputs = video_prompts(unwrap(self.policy).cfg, prompts, videos, keys)
            out = generate_groups(self.engine, self.groups, None, sampling, video_prompts=inputs, return_logprobs=True,
                                  split=self.split)
        else:
            with torch.no_grad():
                embeds = prompt_embeddings(self.policy, self.groups, prompts, cache=self.cache, cache_keys=keys)
            positions_of = getattr(unwrap(self.policy), "rollout_positions", None)  # multimodal RoPE families
            positions = positions_of(prompts) if positions_of is not None else None
            out = generate_groups(self.engine, self.groups, embeds, sampling, positions=positions, return_logprobs=True,
                                  split=self.split)
        token_groups, logprob_groups = out
        eos = self.tokenizer.eos_id
        responses = [[nonempty(r, eos) for r in g] for g in token_groups]
        if not with_logprobs:
            return responses
        logprobs = [[lp if lp is not None and len(lp) == len(r) else None for r, lp in zip(rg, lg)]
                    for rg, lg in zip(responses, logprob_groups)]
        return responses, logprobs

    def score(self, prompts: Sequence[RLPrompt], token_groups: list[list[list[int]]]) -> Rollouts:
        """Rewards and group advantages of generated responses."""
        cfg = self.cfg
        texts = [self._decode(r) for g in token_groups for r in g]
        truths = [p.ground_truth for p in prompts for _ in range(cfg.group_size)]
        failures = []
        ids = [p.sample_id for p in prompts for _ in range(cfg.group_size)]
        total, parts = compute_rewards(texts, truths, self.reward_spec, failures=failures, ids=ids,
                                       time_limit_s=cfg.reward_time_limit_s)
        for failure in failures:
            self.reward_report.count(failure.reason, failure.message)
        if cfg.overlong_buffer:
            lengths = torch.tensor([len(r) for g in token_groups for r in g], device="cpu")
            parts["overlong"] = overlong_penalty(lengths, cfg.sampling.max_new_tokens, cfg.overlong_buffer,
                                                 cfg.overlong_penalty).to(total.dtype)
            total = total + parts["overlong"]
        g = cfg.group_size
        rewards = total.view(-1, g).float()
        parts = {k: v.view(-1, g).float() for k, v in parts.items()}
        failed = ~torch.isfinite(rewards).all(dim=1)  # [groups]: a response could not be scored
        if failed.any():  # the group is left out: zero rewards (equal: no advantage, dropped by dynamic sampling)
            rewards = torch.where(failed[:, None], 0.0, rewards)
            parts = {k: torch.where(failed[:, None] | ~torch.isfinite(v), 0.0, v) for k, v in parts.items()}
        advantages = self.advantages(rewards)
        return Rollouts(list(prompts), token_groups, rewards, parts, advantages, failed_groups=int(failed.sum()))

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """``[groups, G]`` advantages of ``[groups, G]`` rewards, within their groups. REINFORCE++'s batch
        normalisation needs the step's whole batch: :meth:`normalize_batch`, once the groups are collected."""
        estimator = self.cfg.advantage_estimator
        return compute_advantages(rewards, estimator="dr_grpo" if estimator == "reinforce_pp" else estimator)

    def normalize_batch(self, ro: Rollouts) -> None:
        """REINFORCE++: the group-baselined advantages of the step's groups over every replica, normalised by
        their mean and std (a collective over DP). Groups without signal (all zero: equal rewards, or the
        fillers that keep replicas in step) stay zero and are left out of the statistics."""
        if self.cfg.advantage_estimator != "reinforce_pp":
            return
        adv = ro.advantages  # [groups, G]
        signal = adv.ne(0).any(dim=1)  # [groups]
        moments = batch_moments(adv[signal]).to(self.device)
        if self.groups.dp_size > 1:
            dist.all_reduce(moments, group=self.groups.dp)
        if float(moments[0]) < 2:  # fewer than two values with signal in the whole batch: nothing to scale
            return
        ro.advantages = torch.where(signal[:, None], batch_normalize(adv, moments=moments.cpu()), torch.zeros_like(adv))

    def _decode(self, ids: list[int]) -> str:
        """Response text for the rewards: without the stop token that ended it (it stays in the token
        ids the policy is trained on), and without ids of a vocabulary padded past the tokenizer's."""
        if ids and ids[-1] in self.cfg.sampling.stop_token_ids:
            ids = ids[:-1]
        vocab = self.tokenizer.vocab_size
        return self.tokenizer.decode([t for t in ids if t < vocab])

    # ------------------------------------------------------------------------------------------ #
    def _pieces(self, ro: Rollouts, idx: Sequence[int]) -> list[list[tuple[int, int, int]]]:
        """The micro-batches of the groups ``idx``: lists of (group, first response, end response)."""
        m = self.cfg.responses_per_microbatch
        if m is None:
            k = self.cfg.groups_per_microbatch
            return [[(i, 0, len(ro.responses[i])) for i in idx[s : s + k]] for s in range(0, len(idx), k)]
        return [[(i, a, min(a + m, len(ro.responses[i])))] for i in idx for a in range(0, len(ro.responses[i]), m)]

    def _batches(self, ro: Rollouts, idx: Sequence[int], model):
        """Prefill micro-batches of the groups ``idx`` for ``model``: (batch, videos, keys, pieces, frame spacing:
        each prompt's ``spacing(k)`` per video, the spacing its rollouts were drawn with; None when no prompt
        gives one)."""
        out = []
        for piece in self._pieces(ro, idx):
            prompts = [ro.prompts[i] for i, _, _ in piece]
            batch = build_prefill_batch([p.prompt_ids for p in prompts],
                                        [[torch.tensor(r, device="cpu") for r in ro.responses[i][a:b]] for i, a, b in piece],
                                        pack=self.cfg.pack, pad_id=self.pad_id)
            spacing = None
            if any(p.seconds_per_frame is not None for p in prompts):
                spacing = [[p.spacing(k) for k in range(len(p.videos))] for p in prompts]
            out.append((batch, [list(p.videos) for p in prompts], self._keys(prompts, model), piece, spacing))
        return out

    def _logprobs(self, model, ro: Rollouts, idx: Sequence[int]) -> list[torch.Tensor]:
        """Dense per-target log-probs under ``model`` of each micro-batch of the groups ``idx``."""
        batches = self._batches(ro, idx, model)
        steps = [prefill_step(self.groups, batch, videos=videos, cache=self.cache, cache_keys=keys, pad_id=self.pad_id,
                              seconds_per_frame=spacing)
                 for batch, videos, keys, _, spacing in batches]
        with torch.no_grad():
            reports = forward_backward(model, lambda step, chunk: step(None, chunk), steps, forward_only=True,
                                       seq_length=max(b.input_ids.shape[1] for b, *_ in batches),
                                       micro_batch_size=max(b.input_ids.shape[0] for b, *_ in batches))
        return [r["logp"] for r in reports]

    def _loss_fn(self, batch, advantages, old, ref, engine=None):
        """The loss of one micro-batch; ``engine``: the engine's log-probs of its targets (dense, NaN
        where the engine gave none), for TIS and the ``rollout/logprob_diff_*`` metrics."""
        cfg, groups, device = self.cfg, self.groups, self.device
        lengths = batch.response_lengths.float()  # [R] (host)
        max_len = int(lengths.max())
        position = torch.cat([torch.arange(int(n), device="cpu") for n in batch.response_lengths])  # [n] index in its response
        # what meets the log-probs, on their device (one copy each per micro-batch)
        response_index, position = batch.response_index.to(device), position.to(device)
        lengths_d, advantages = lengths.to(device), advantages.to(device)
        engine = None if engine is None else engine.to(device)
        seq_level = cfg.loss.aggregation != "token_mean"

        def loss_fn(logp, entropy, plan):
            rows, cols = response_index[plan.owned], position[plan.owned]
            shape = (batch.num_responses, max_len)

            def grid(values):  # owned targets -> [responses, max_len]
                return values.new_zeros(shape).index_put((rows, cols), values)

            mask = grid(torch.ones_like(logp))
            old_owned = old[plan.owned]
            engine_grid, diff = None, None
            if engine is not None:
                given = ~torch.isnan(engine[plan.owned])  # a response without engine log-probs: ratio 1
                engine_grid = grid(torch.where(given, engine[plan.owned], old_owned))
                known = grid(given.to(logp.dtype))
                diff = logprob_diff(engine_grid, grid(old_owned), known, num_global_tokens=1.0)
                diff = torch.stack([diff["mean"], known.sum(), diff["max"]])  # [sum |e - o|, tokens, max]
            seq_ratio = None
            if cfg.loss.policy_loss == "gspo":  # one ratio per response: its log-ratios summed over every CP rank
                seq_ratio = sequence_log_ratio_sum(grid(logp), grid(old_owned), mask)
                if groups.cp_size > 1:
                    dist.all_reduce(seq_ratio, group=groups.cp)
            loss, metrics = grpo_loss(
                grid(logp), grid(old_owned), None if ref is None else grid(ref[plan.owned]),
                advantages, mask, cfg.loss, entropy=grid(entropy.detach()), engine_logp=engine_grid,
                num_global_tokens=1.0, num_global_sequences=1.0, seq_num_tokens=lengths_d, seq_log_ratio_sum=seq_ratio,
            )
            # per-token loss normalisation by megatron: count each target (or each sequence) once
            if seq_level:
                count = batch.num_responses if groups.cp_rank == 0 else 0
            else:
                count = int(plan.owned.numel())
            zero = torch.zeros((), device=logp.device)
            report = {
                "token_sums": torch.stack([metrics.get(k, zero).float() for k in _TOKEN_METRICS]),
                "loss_sums": torch.stack([metrics.get(k, zero).float() for k in _LOSS_METRICS]),
                "tokens": torch.tensor(float(plan.owned.numel()), device=logp.device),
                "count": torch.tensor(float(count), device=logp.device),
            }
            if diff is not None:
                report["logprob_diff"] = diff.float()
            return loss, torch.tensor(count, dtype=torch.int, device=logp.device), report

        return loss_fn

    def update(self, ro: Rollouts, idx: Sequence[int], old: list, ref: Optional[list]) -> dict:
        """One optimizer step on the groups ``idx`` (their micro-batches' old/ref log-probs given)."""
        batches = self._batches(ro, idx, self.policy)
        self.policy.zero_grad_buffer()
        self.optimizer.zero_grad()
        steps = []
        for j, (batch, videos, keys, piece, spacing) in enumerate(batches):
            adv = torch.cat([ro.advantages[i, a:b] for i, a, b in piece])  # [R] in (group, response) order, as the batch
            engine = None
            if ro.engine_logprobs is not None:  # [targets]: each response's tokens in turn, as the batch's targets
                engine = torch.cat([torch.tensor(lp if lp is not None else [math.nan] * len(r), dtype=torch.float32, device="cpu")
                                    for i, a, b in piece for r, lp in zip(ro.responses[i][a:b], ro.engine_logprobs[i][a:b])])
            steps.append(prefill_step(self.groups, batch, videos=videos, cache=self.cache, cache_keys=keys, pad_id=self.pad_id,
                                      loss_fn=self._loss_fn(batch, adv, old[j], None if ref is None else ref[j], engine),
                                      seconds_per_frame=spacing))
        # one schedule call over all micro-batches: megatron reduces and normalises the gradients once
        reports = forward_backward(self.policy, lambda step, chunk: step(None, chunk), steps,
                                   seq_length=max(b.input_ids.shape[1] for b, *_ in batches),
                                   micro_batch_size=max(b.input_ids.shape[0] for b, *_ in batches))
        totals = torch.stack([torch.cat([r["token_sums"], r["loss_sums"], r["tokens"][None], r["count"][None]])
                              for r in reports]).sum(0)
        dist.all_reduce(totals, group=self.groups.dp_cp)
        # the step's one device-to-host read of its metrics (the NaN check below steers control flow)
        totals = totals.cpu()
        tokens, count = totals[-2].clamp(min=1), totals[-1].clamp(min=1)
        nt = len(_TOKEN_METRICS)
        metrics = {k: (v / tokens).item() for k, v in zip(_TOKEN_METRICS, totals[:nt])}
        metrics.update({k: (v / count).item() for k, v in zip(_LOSS_METRICS, totals[nt : nt + len(_LOSS_METRICS)])})
        if self.cfg.loss.tis_cap is None:
            metrics.pop("tis_weight_mean"), metrics.pop("tis_clip_frac")
        if "logprob_diff" in reports[0]:  # engine vs trainer-old log-probs of the sampled tokens
            diff = torch.stack([r["logprob_diff"] for r in reports])  # [micro-batches, 3]
            sums, top = diff[:, :2].sum(0), diff[:, 2].max()
            dist.all_reduce(sums, group=self.groups.dp_cp)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.groups.dp_cp)
            metrics["rollout/logprob_diff_mean"] = (sums[0] / sums[1].clamp(min=1)).item()
            metrics["rollout/logprob_diff_max"] = top.item()
        finite = torch.tensor([1.0 if math.isfinite(metrics["loss"]) else 0.0], device=self.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0:
            warnings.warn(f"GRPO step {self.step_count}: non-finite loss {metrics['loss']}; the update is skipped")
            self.policy.zero_grad_buffer()
            self.optimizer.zero_grad()
            metrics["skipped"] = 1.0
            return metrics
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])  # the rate this update uses
        ok, grad_norm, _ = self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step(increment=1)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["skipped"] = 0.0 if ok else 1.0
        return metrics

    # ------------------------------------------------------------------------------------------ #
    def collect(self, draw: Callable[[int], list[RLPrompt]]) -> tuple[Rollouts, dict]:
        """Rollouts for one step: ``prompts_per_step`` groups (refilled by dynamic sampling)."""
        cfg = self.cfg
        if not cfg.dynamic_sampling:
            ro = self.rollout(draw(cfg.prompts_per_step))
            return ro, {"groups_dropped": 0.0}
        sampler = DynamicSampler(DynamicSamplingConfig(num_target_groups=cfg.prompts_per_step, max_rounds=cfg.max_refill_rounds))
        rounds = []
        need = sampler.num_to_draw()
        while need:
            ro = self.rollout(draw(need))
            rounds.append(ro)
            need = sampler.add([(ro, i) for i in range(len(ro.prompts))], ro.rewards)
        kept, stats = sampler.take()
        # Every data-parallel replica trains on the same number of groups: the optimizer steps (and the
        # gradient all-reduce in each) follow it. A replica short of the most any replica kept fills up
        # with its own dropped groups, whose advantages are zero (no policy gradient); with nothing kept
        # anywhere, every replica trains on prompts_per_step such groups.
        target = self._agree_max(len(kept)) or cfg.prompts_per_step
        chosen = {(id(r), i) for r, i in kept}
        spare = [(r, i) for r in reversed(rounds) for i in range(len(r.prompts)) if (id(r), i) not in chosen]
        filled = spare[: max(target - len(kept), 0)]
        kept = kept + filled
        merged = Rollouts(
            prompts=[r.prompts[i] for r, i in kept],
            responses=[r.responses[i] for r, i in kept],
            rewards=torch.stack([r.rewards[i] for r, i in kept]),
            parts={k: torch.stack([r.parts[k][i] for r, i in kept]) for k in kept[0][0].parts},
            advantages=torch.stack([r.advantages[i] if (id(r), i) in chosen else torch.zeros_like(r.advantages[i])
                                    for r, i in kept]),
            generated_rewards=torch.cat([r.rewards for r in rounds]),
            failed_groups=sum(r.failed_groups for r in rounds),
            generated_parts={k: torch.cat([r.parts[k] for r in rounds]) for k in rounds[0].parts},
            engine_logprobs=None if kept[0][0].engine_logprobs is None else [r.engine_logprobs[i] for r, i in kept],
        )
        return merged, {"groups_dropped": float(stats.num_dropped_groups), "refill_rounds": float(stats.num_rounds),
                        "groups_filled": float(len(filled))}

    def _agree_max(self, value: int) -> int:
        """The largest ``value`` over the data-parallel replicas (every rank calls it)."""
        if self.groups.dp_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.groups.dp)
        return int(t.item())

    def step(self, draw: Callable[[int], list[RLPrompt]]) -> dict:
        """One GRPO step; ``draw(k)`` returns k new prompts for this replica. Returns the metrics."""
        cfg, times = self.cfg, {}
        t0 = time.perf_counter()
        encode_before = encode_stats().seconds
        hits_before = self.cache.stats.hits + self.cache.stats.disk_hits
        if self.engine is not None:
            self.engine.wake()
        self._versions, self._round = {}, 0
        self.sync_weights()
        times["time/sync"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        ro, sample_stats = self.collect(draw)
        self.normalize_batch(ro)
        if self.engine is not None:
            self.engine.sleep()
        times["time/rollout"] = time.perf_counter() - t1

        per = math.ceil(len(ro.prompts) / cfg.num_minibatches)
        minibatches = [list(range(m, min(m + per, len(ro.prompts)))) for m in range(0, len(ro.prompts), per)]
        t2 = time.perf_counter()
        old = [self._logprobs(self.policy, ro, idx) for idx in minibatches]  # before any update
        times["time/old_logprobs"] = time.perf_counter() - t2
        ref = [None] * len(minibatches)
        if self.reference is not None:
            t3 = time.perf_counter()
            self._reference_to(self.device if self.device.type != "cpu" else None)
            ref = [self._logprobs(self.reference, ro, idx) for idx in minibatches]
            self._reference_to(torch.device("cpu") if cfg.offload_reference else None)
            times["time/ref_logprobs"] = time.perf_counter() - t3

        t4 = time.perf_counter()
        updates = []
        for _ in range(cfg.update_epochs):
            for idx, o, r in zip(minibatches, old, ref):
                updates.append(self.update(ro, idx, o, r))
        times["time/update"] = time.perf_counter() - t4
        times["time/step"] = time.perf_counter() - t0
        times["time/encode"] = encode_stats().seconds - encode_before  # inside the phases above
        self.step_count += 1
        metrics = self._metrics(ro, updates, sample_stats, times, hits_before)
        self._report(ro, metrics)
        return metrics

    def _reference_to(self, device):
        if device is not None and self.cfg.offload_reference and self.reference is not None:
            self.reference.to(device)

    # ------------------------------------------------------------------------------------------ #
    def _metrics(self, ro: Rollouts, updates: list[dict], sample_stats: dict, times: dict, hits_before: int) -> dict:
        frames = sum(p.num_frames for p in ro.prompts)
        lengths = torch.tensor([len(r) for g in ro.responses for r in g], dtype=torch.float64, device="cpu")
        rewards, parts = ro.generated_rewards.double(), ro.generated_parts
        local = torch.tensor([rewards.sum().item(), (rewards ** 2).sum().item(), rewards.numel(), lengths.sum().item(),
                              lengths.numel()] + [parts[k].sum().item() for k in sorted(parts)] + [ro.failed_groups], dtype=torch.float64,
                             device=self.device)
        dist.all_reduce(local, group=self.groups.dp)
        local = local.cpu()
        n = local[2]
        mean = local[0] / n
        metrics = {
            "reward/mean": mean.item(),
            "reward/std": (local[1] / n - mean ** 2).clamp(min=0).sqrt().item(),
            "response/length": (local[3] / local[4]).item(),
        }
        for i, k in enumerate(sorted(parts)):
            metrics[f"reward/{k}"] = (local[5 + i] / n).item()
        metrics["reward/failed_groups"] = local[-1].item()  # left out: a reward could not score a response
        for key in updates[-1]:
            if key == "rollout/logprob_diff_max":
                metrics[key] = max(u[key] for u in updates)
            else:
                metrics[key if key.startswith("rollout/") else f"train/{key}"] = sum(u[key] for u in updates) / len(updates)
        metrics.update({f"sampling/{k}": v for k, v in sample_stats.items()})
        hits = self.cache.stats.hits + self.cache.stats.disk_hits - hits_before
        metrics["cache/hit_rate"] = self.cache.stats.hit_rate
        metrics["cache/hits_this_step"] = float(hits)
        metrics.update(times)
        metrics["throughput/frames_per_s"] = frames * self.groups.dp_size / max(times["time/step"], 1e-9)
        return metrics

    def _report(self, ro: Rollouts, metrics: dict) -> None:
        if dist.get_rank() != 0:
            return
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, self.step_count)
        every = self.cfg.log_samples_every
        if every and (self.step_count == 1 or self.step_count % every == 0):
            text = self._decode(ro.responses[0][0])
            line = f"[step {self.step_count}] sample {ro.prompts[0].sample_id!r} reward={ro.rewards[0, 0].item():.2f}: {text!r}"
            self.log(line)
            if self.writer is not None:
                self.writer.add_text("rollouts/sample", line, self.step_count)


# grpo_loss metrics, summed over local tokens (num_global_tokens=1) then divided by the global count
_TOKEN_METRICS = ("kl_ref", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl", "ratio_mean", "entropy",
                  "tis_weight_mean", "tis_clip_frac")
# aggregated losses, divided by what megatron divides the loss by (tokens, or sequences)
_LOSS_METRICS = ("loss", "pg_loss", "kl_loss")
