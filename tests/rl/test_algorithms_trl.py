"""Our RL algorithms against TRL's own code (checked with TRL 0.25.0; skipped when TRL is absent).

TRL's trainers are not built (that needs a model, a tokenizer and a dataset). Instead their methods are
called unbound on a stand-in object that carries only the attributes they read, with the generation, the
log-prob forward passes and the reward functions replaced by fixed tensors. Compared, in float64:

* ``GRPOTrainer._generate_and_score_completions`` then ``GRPOTrainer._compute_loss`` (the whole TRL
  GRPO step after generation) against ``compute_advantages`` then ``grpo_loss``: the advantages, the
  loss, its gradient w.r.t. the policy log-probs, and the kl / entropy / clip-fraction metrics, for
    - ``scale_rewards`` "group" / "none"  ->  estimator "grpo" / "dr_grpo" (``eps=1e-4``, TRL's constant);
    - ``loss_type`` "grpo" / "bnpo" / "dr_grpo" / "dapo"  ->  aggregation "seq_mean" / "token_mean" /
      "seq_sum_token_mean" (``norm_len = max_completion_length``) / "token_mean" with
      ``num_global_tokens = num_items_in_batch``;
    - ``importance_sampling_level`` "token" / "sequence"  ->  policy_loss "ppo" / "gspo" (TRL's sequence
      level back-propagates through the mean log-ratio: the sequence form; so this also checks that our
      per-token factorisation has the sequence form's gradient), with GSPO's paper clip ranges 3e-4 / 4e-4;
    - ``beta > 0``  ->  ``kl_beta`` with ``kl_estimator="k3"``;
    - ``delta`` (TRL's two-sided clip)  ->  ``dual_clip_c`` (equal whenever delta > 1 + epsilon_high);
    - ``vllm_importance_sampling_correction`` with its cap  ->  ``tis_cap`` (``engine_logp`` = the sampler's).
      With GSPO, TRL's sequence form spreads a sequence's gradient over its tokens by the sequence's mean TIS
      weight, ours by each token's own weight (losses.py doc): there the per-sequence gradient sums are compared.
  The clip-fraction metrics are compared at the token level only (TRL counts sequences at the sequence level,
  we count their tokens).
* ``RLOOTrainer._generate_and_score_completions``'s advantages (``normalize_advantages`` off / on)
  against ``compute_advantages(estimator="rloo")`` / then ``batch_normalize(eps=1e-4)``.
* ``trl.rewards.get_soft_overlong_punishment`` against ``overlong_penalty``.

Not in TRL 0.25, so checked only against closed forms in test_losses.py / test_advantages.py: CISPO, the
importance-weighted KL, REINFORCE++ with baseline (TRL's ``scale_rewards="batch"`` divides by the batch
std of the raw rewards without re-centring, which is a different estimator). RLOOTrainer's loss (ratio of
whole-sequence probabilities, KL folded into the reward) is not one of ours and is not compared.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from megatron_longvideo.rl.advantages import batch_normalize, compute_advantages, overlong_penalty
from megatron_longvideo.rl.losses import GRPOLossConfig, grpo_loss

CHECKED_VERSION = "0.25."
NUM_GENERATIONS = 4
LENGTHS = [3, 1, 6, 4, 2, 5, 6, 6, 1, 3, 4, 2]  # completion lengths of 3 groups of 4
MAX_COMPLETION_LENGTH = 8


def import_trl():
    """The ``trl`` module, or a skip saying why it cannot be imported (absent, or a dependency missing)."""
    try:
        import trl
    except ImportError as err:
        pytest.skip(f"TRL cannot be imported ({err}); these checks need trl==0.25.0 with its dependencies")
    return trl


@pytest.fixture(scope="module")
def trl_trainers():
    """TRL's GRPOTrainer and RLOOTrainer modules, or a skip saying why they are unavailable."""
    trl = import_trl()
    if not trl.__version__.startswith(CHECKED_VERSION):
        pytest.skip(f"these tests call private methods of TRL {CHECKED_VERSION}x; found TRL {trl.__version__}")
    import trl.import_utils as flags

    # TRL 0.25 stores transformers' _is_package_available(name) as is; transformers >= 5 returns a
    # (bool, version) tuple there, which is always truthy, so TRL would import absent optional packages
    # (mergekit, ...). Keep only the bool.
    for name, value in list(vars(flags).items()):
        if name.endswith("_available") and isinstance(value, tuple):
            setattr(flags, name, bool(value[0]))
    try:
        from trl.trainer import grpo_trainer, rloo_trainer
    except (ImportError, RuntimeError) as err:  # TRL wraps a failed lazy import in RuntimeError
        pytest.skip(f"TRL's trainers cannot be imported here: {err}")
    return grpo_trainer, rloo_trainer


class _Model:
    training = True


class _Accelerator:
    device = torch.device("cpu")
    process_index = 0
    num_processes = 1

    @staticmethod
    def gather(t):
        return t


class _Tokenizer:
    @staticmethod
    def batch_decode(ids, skip_special_tokens=True):
        return ["" for _ in ids]


class StandIn:
    """What TRL's methods read of ``self``: plain attributes plus stubs for generation, the log-prob forward
    passes (a fixed tensor per model object) and the reward functions (fixed rewards)."""

    def __init__(self, trainer: str, *, logps: list, completions, rewards, sampling_logps=None, **attributes):
        self._trainer = trainer  # "grpo" or "rloo": what _generate returns
        self._logps = {id(model): value for model, value in logps}
        self._completions = completions
        self._rewards = rewards
        self._sampling = sampling_logps
        self._entropy = attributes.pop("entropy", None)
        self.accelerator = _Accelerator()
        self.processing_class = _Tokenizer()
        self.pad_token_id, self.eos_token_id = 0, 1
        self.mask_truncated_completions = False
        self.num_generations = NUM_GENERATIONS
        self.num_iterations = 1
        self.reward_func_names = ["reward"]
        self.reward_weights = torch.ones(1, dtype=torch.float64)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._logs = {"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": []}
        for name, value in attributes.items():
            setattr(self, name, value)

    def _generate(self, prompts):
        prompt_ids = [[7, 8] for _ in prompts]
        if self._trainer == "rloo":
            return prompt_ids, self._completions
        return prompt_ids, self._completions, sum(len(c) for c in self._completions), self._sampling, {}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, **kwargs):
        logps = self._logps[id(model)]
        assert logps.shape == (input_ids.shape[0], logits_to_keep)
        return logps, (self._entropy if compute_entropy else None)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        return self._rewards[:, None]


def make_case(level: str, seed: int = 0):
    """Rewards (one degenerate group), log-probs of the policy / old policy / reference / sampler on a
    right-padded [12, 6] grid (finite padding: TRL multiplies by the mask), entropies, and the mask."""
    g = torch.Generator().manual_seed(seed)
    n, width = len(LENGTHS), max(LENGTHS)
    mask = torch.arange(width)[None, :] < torch.tensor(LENGTHS)[:, None]  # [n, T]
    rewards = torch.randint(0, 3, (n,), generator=g).to(torch.float64)
    rewards[4:8] = 1.0  # zero-std group
    old = -3 * torch.rand(n, width, generator=g, dtype=torch.float64)
    if level == "token":  # ratios 0.45..2.2: both clip sides
        logp = old + 1.6 * (torch.rand(n, width, generator=g, dtype=torch.float64) - 0.5)
    else:  # sequence mean log-ratios of order 1e-3 against clip ranges 3e-4 / 4e-4
        offset = 2e-3 * (torch.rand(n, 1, generator=g, dtype=torch.float64) - 0.5)
        logp = old + offset + 2e-3 * (torch.rand(n, width, generator=g, dtype=torch.float64) - 0.5)
    ref = old + 0.3 * torch.randn(n, width, generator=g, dtype=torch.float64)
    # TRL builds the sampler's log-probs with torch.tensor(list of floats): float32
    sampling = (old + 0.2 * torch.randn(n, width, generator=g, dtype=torch.float64)).float().double()
    entropy = torch.rand(n, width, generator=g, dtype=torch.float64)
    return dict(rewards=rewards, old=old, logp=logp, ref=ref, sampling=sampling, entropy=entropy, mask=mask)


AGGREGATION = {"grpo": "seq_mean", "bnpo": "token_mean", "dr_grpo": "seq_sum_token_mean", "dapo": "token_mean"}
GRPO_CASES = (
    [dict(level="token", loss_type=t, eps=(0.2, 0.28), beta=0.04) for t in AGGREGATION]
    + [dict(level="sequence", loss_type=t, eps=(3e-4, 4e-4), beta=0.04) for t in AGGREGATION]
    + [
        dict(level="token", loss_type="dapo", eps=(0.2, 0.28), beta=0.0, delta=1.5, scale="none", tis_cap=2.0),
        dict(level="sequence", loss_type="grpo", eps=(3e-4, 4e-4), beta=0.0, scale="none", tis_cap=2.0),
        dict(level="token", loss_type="grpo", eps=(0.2, 0.2), beta=0.02, delta=1.3),
    ]
)


@pytest.mark.parametrize("case", GRPO_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_grpo_step_matches_trl(trl_trainers, monkeypatch, case):
    grpo_trainer, _ = trl_trainers
    monkeypatch.setattr(grpo_trainer, "gather_object", lambda obj: obj)
    trainer_cls = grpo_trainer.GRPOTrainer
    level, loss_type, (eps_low, eps_high), beta = case["level"], case["loss_type"], case["eps"], case["beta"]
    scale, delta, tis_cap = case.get("scale", "group"), case.get("delta"), case.get("tis_cap")
    data = make_case(level)
    mask = data["mask"]
    policy, ref_model, current = _Model(), _Model(), _Model()
    trl_logp = data["logp"].clone().requires_grad_()
    stand_in = StandIn(
        "grpo",
        logps=[(policy, data["old"]), (ref_model, data["ref"]), (current, trl_logp)],
        completions=[[5] * n for n in LENGTHS],
        rewards=data["rewards"],
        sampling_logps=[row[:n].tolist() for row, n in zip(data["sampling"], LENGTHS)] if tis_cap else None,
        entropy=data["entropy"],
        model=policy, ref_model=ref_model,
        args=types.SimpleNamespace(per_device_train_batch_size=len(LENGTHS), steps_per_generation=2,
                                   gradient_accumulation_steps=1, delta=delta),
        use_vllm=tis_cap is not None, vllm_importance_sampling_correction=tis_cap is not None,
        vllm_importance_sampling_cap=tis_cap,
        beta=beta, scale_rewards=scale, top_entropy_quantile=1.0, importance_sampling_level=level,
        epsilon_low=eps_low, epsilon_high=eps_high, loss_type=loss_type, current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH,
    )
    inputs = trainer_cls._generate_and_score_completions(stand_in, [{"prompt": "p"} for _ in LENGTHS])
    assert torch.equal(inputs["completion_mask"].bool(), mask)
    trl_loss = trainer_cls._compute_loss(stand_in, current, inputs)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in stand_in._metrics["train"].items()}

    advantages = compute_advantages(data["rewards"], estimator="grpo" if scale == "group" else "dr_grpo",
                                    group_size=NUM_GENERATIONS, eps=1e-4)
    torch.testing.assert_close(inputs["advantages"], advantages)
    cfg = GRPOLossConfig(
        policy_loss="ppo" if level == "token" else "gspo", clip_eps_low=eps_low, clip_eps_high=eps_high,
        dual_clip_c=delta, kl_beta=beta, kl_estimator="k3", aggregation=AGGREGATION[loss_type],
        norm_len=MAX_COMPLETION_LENGTH, tis_cap=tis_cap,
    )
    logp = data["logp"].clone().requires_grad_()
    loss, metrics = grpo_loss(
        logp, data["old"], data["ref"], advantages, mask, cfg, entropy=data["entropy"],
        engine_logp=data["sampling"] if tis_cap else None,
        num_global_tokens=inputs["num_items_in_batch"] if loss_type == "dapo" else None,
    )
    loss.backward()

    torch.testing.assert_close(loss, trl_loss)
    trl_grad = torch.where(mask, trl_logp.grad, 0.0)
    if level == "sequence" and tis_cap:
        # GSPO with per-token TIS weights w_it: TRL's sequence form gives every token of a sequence the
        # sequence's mean weight, ours (per-token form) each token its own weight; the per-sequence
        # gradient sums are the same, and ours is proportional to w_it within each sequence.
        torch.testing.assert_close(logp.grad.sum(dim=1), trl_grad.sum(dim=1))
        w = torch.exp(data["old"] - data["sampling"]).clamp(max=tis_cap)
        per_weight = torch.where(mask, logp.grad / w, 0.0)
        torch.testing.assert_close(per_weight, torch.where(mask, per_weight[:, :1], 0.0))
    else:
        torch.testing.assert_close(logp.grad, trl_grad)
    assert (logp.grad != 0).any()
    assert metrics["entropy"].item() == pytest.approx(trl_metrics["entropy"])
    if beta:
        assert metrics["kl_ref"].item() == pytest.approx(trl_metrics["kl"])
    if level == "token":
        assert metrics["clip_frac_low"].item() == pytest.approx(trl_metrics["clip_ratio/low_mean"])
        assert metrics["clip_frac_high"].item() == pytest.approx(trl_metrics["clip_ratio/high_mean"])
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0  # both sides exercised
    if delta is not None:
        assert metrics["dual_clip_frac"] > 0


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_match_trl(trl_trainers, monkeypatch, normalize):
    _, rloo_trainer = trl_trainers
    monkeypatch.setattr(rloo_trainer, "gather_object", lambda obj: obj)
    data = make_case("token", seed=1)
    policy = _Model()
    stand_in = StandIn(
        "rloo", logps=[(policy, data["old"])], completions=[[5] * n for n in LENGTHS], rewards=data["rewards"],
        model=policy, args=types.SimpleNamespace(per_device_train_batch_size=len(LENGTHS)),
        beta=0.0, reward_clip_range=None, normalize_advantages=normalize,
    )
    out = rloo_trainer.RLOOTrainer._generate_and_score_completions(stand_in, [{"prompt": "p"} for _ in LENGTHS])
    expected = compute_advantages(data["rewards"], estimator="rloo", group_size=NUM_GENERATIONS)
    if normalize:
        expected = batch_normalize(expected, eps=1e-4)
    torch.testing.assert_close(out["advantages"], expected)
    assert expected.abs().max() > 0.5


def test_overlong_penalty_matches_trl():
    trl = import_trl()
    from trl.rewards import get_soft_overlong_punishment

    lengths = list(range(0, 40))
    for max_len, buffer in [(32, 8), (32, 0), (20, 20), (16, 1)]:
        theirs = get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=buffer)(
            completion_ids=[[1] * n for n in lengths])
        ours = overlong_penalty(lengths, max_len, buffer)
        torch.testing.assert_close(ours, torch.tensor(theirs, dtype=torch.float32), msg=f"{trl.__version__}")
