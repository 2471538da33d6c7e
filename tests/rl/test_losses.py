"""GRPO loss (PPO, GSPO, CISPO; KL): hand-computed values, closed forms, clipping gradients, gradcheck,
split-batch invariance."""

import dataclasses
import math

import pytest
import torch

from megatron_longvideo.rl.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    GRPOLossConfig,
    clipped_surrogate,
    grpo_loss,
    kl_penalty,
    logprob_diff,
    needs_reference,
    sequence_log_ratio_sum,
    truncated_is_weights,
)

LN2 = math.log(2.0)


def test_config_defaults_and_needs_reference():
    cfg = GRPOLossConfig()
    assert (cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c, cfg.kl_beta) == (0.2, 0.2, None, 0.0)
    assert not needs_reference(cfg)
    assert needs_reference(GRPOLossConfig(kl_beta=0.01))
    with pytest.raises(TypeError):
        GRPOLossConfig(0.2)  # keyword-only


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(clip_eps_low=-0.1), "clip_eps_low"),
        (dict(clip_eps_low=1.0), "clip_eps_low"),
        (dict(clip_eps_high=-0.1), "clip_eps_high"),
        (dict(clip_eps_high=math.inf), "clip_eps_high"),
        (dict(dual_clip_c=1.0), "dual_clip_c"),
        (dict(kl_beta=-0.5), "kl_beta"),
        (dict(kl_beta=math.nan), "kl_beta"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(aggregation="mean"), "aggregation"),
        (dict(aggregation="seq_sum_token_mean"), "norm_len"),
        (dict(aggregation="seq_sum_token_mean", norm_len=0), "norm_len"),
        (dict(max_log_ratio=0.0), "max_log_ratio"),
        (dict(tis_cap=0.0), "tis_cap"),
        (dict(tis_cap=math.inf), "tis_cap"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GRPOLossConfig(**kwargs)


def test_kl_estimators_by_hand():
    # logp = 0, ref = ln 2: d = ref - logp = ln 2 = 0.693147
    #   k1 = -d = -0.693147;  k2 = d^2 / 2 = 0.240227;  k3 = e^d - d - 1 = 2 - 0.693147 - 1 = 0.306853
    # logp = ln 2, ref = 0: d = -ln 2
    #   k1 = 0.693147;  k2 = 0.240227;  k3 = 0.5 + 0.693147 - 1 = 0.193147
    logp = torch.tensor([0.0, LN2], dtype=torch.float64)
    ref = torch.tensor([LN2, 0.0], dtype=torch.float64)
    expected = {
        "k1": [-0.693147, 0.693147],
        "k2": [0.240227, 0.240227],
        "k3": [0.306853, 0.193147],
    }
    for name, values in expected.items():
        expected_values = torch.tensor(values, dtype=torch.float64)
        torch.testing.assert_close(kl_penalty(logp, ref, name), expected_values, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, ref, "k5")


def four_token_case():
    """4 sequences of 2 tokens; only the first token counts, the second is padding holding nan."""
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5], dtype=torch.float64)
    old = torch.tensor([[-1.0, 0.0]] * 4, dtype=torch.float64)
    logp = old.clone()
    logp[:, 0] += ratios.log()
    logp[:, 1] = math.nan
    mask = torch.tensor([[1, 0]] * 4)
    advantages = torch.tensor([1.0, -2.0, -1.0, 1.0], dtype=torch.float64)
    return logp.requires_grad_(), old, advantages, mask


def test_clipped_surrogate_by_hand_and_zero_grad_on_clipped_side():
    # eps_low = 0.2 (floor 0.8), eps_high = 0.28 (ceiling 1.28). Per-token loss -min(rA, clip(r)A):
    #   r=1.5, A=+1: -min(1.5, 1.28) = -1.28   (clipped high: zero gradient)
    #   r=0.5, A=-2: -min(-1.0, -1.6) = 1.6    (clipped low: zero gradient)
    #   r=1.5, A=-1: -min(-1.5, -1.28) = 1.5   (unclipped: d/dlogp = r = 1.5)
    #   r=0.5, A=+1: -min(0.5, 0.8) = -0.5     (unclipped: d/dlogp = -r = -0.5)
    # token mean over 4 tokens: (-1.28 + 1.6 + 1.5 - 0.5) / 4 = 0.33; gradients / 4.
    logp, old, adv, mask = four_token_case()
    cfg = GRPOLossConfig(clip_eps_low=0.2, clip_eps_high=0.28)
    per_token, _, _ = clipped_surrogate(logp[:, :1], old[:, :1], adv[:, None], cfg)
    torch.testing.assert_close(per_token[:, 0], torch.tensor([-1.28, 1.6, 1.5, -0.5], dtype=torch.float64))
    loss, metrics = grpo_loss(logp, old, None, adv, mask, cfg)
    torch.testing.assert_close(loss, torch.tensor(0.33, dtype=torch.float64))
    loss.backward()
    expected_grad = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.375, 0.0], [-0.125, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected_grad)  # padding: zero, not nan
    assert metrics["clip_frac_low"].item() == pytest.approx(0.25)
    assert metrics["clip_frac_high"].item() == pytest.approx(0.25)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)  # (1.5 + 0.5 + 1.5 + 0.5) / 4
    assert metrics["pg_loss"].item() == pytest.approx(0.33)
    assert "kl_loss" not in metrics and "dual_clip_frac" not in metrics
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_dual_clip_by_hand():
    # A = -1, c = 3, eps = 0.2:
    #   r=5: PPO loss -min(-5, -1.2) = 5, dual clip min(5, 3) = 3 -> constant, zero gradient
    #   r=2: PPO loss 2 < 3, unchanged, gradient r = 2
    ratios = torch.tensor([[5.0, 2.0]], dtype=torch.float64)
    logp = ratios.log().requires_grad_()
    old = torch.zeros(1, 2, dtype=torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    mask = torch.ones(1, 2)
    loss, metrics = grpo_loss(logp, old, None, adv, mask, GRPOLossConfig(dual_clip_c=3.0))
    torch.testing.assert_close(loss, torch.tensor(2.5, dtype=torch.float64))  # (3 + 2) / 2
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.0]], dtype=torch.float64))  # [0, 2/2]
    assert metrics["dual_clip_frac"].item() == pytest.approx(0.5)
    plain, _ = grpo_loss(logp, old, None, adv, mask, GRPOLossConfig())
    assert plain.item() == pytest.approx(3.5)  # (5 + 2) / 2 without the dual clip


def test_kl_term_by_hand():
    # On-policy (ratio 1), A = 0: the loss is beta * mean k3. logp = 0, ref = ln 2: k3 = 0.306853,
    # d k3 / d logp = 1 - e^(ref - logp) = -1. beta = 0.1, 2 tokens: loss 0.0306853, grad -0.05 each.
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    ref = torch.full((1, 2), LN2, dtype=torch.float64)
    mask = torch.ones(1, 2)
    adv = torch.zeros(1, dtype=torch.float64)
    cfg = GRPOLossConfig(kl_beta=0.1, kl_estimator="k3")
    loss, metrics = grpo_loss(logp, None, ref, adv, mask, cfg)
    torch.testing.assert_close(loss, torch.tensor(0.0306853, dtype=torch.float64), atol=1e-7, rtol=0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.05, -0.05]], dtype=torch.float64))
    assert metrics["kl_ref"].item() == pytest.approx(0.306853, abs=1e-6)
    assert metrics["kl_loss"].item() == pytest.approx(0.306853, abs=1e-6)
    assert metrics["approx_kl"].item() == 0.0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, None, None, adv, mask, cfg)
    # beta = 0: ref only feeds the kl_ref metric.
    loss0, metrics0 = grpo_loss(logp, None, ref, adv, mask, GRPOLossConfig())
    assert loss0.item() == 0.0 and "kl_loss" not in metrics0 and metrics0["kl_ref"].item() > 0.3


def test_aggregations_by_hand():
    # On-policy, so each token's loss is -A_i. Mask [[1, 1, 1], [1, 0, 0]], A = [1, -2]:
    #   sequence sums -3 (3 tokens) and +2 (1 token).
    #   token_mean          (-3 + 2) / 4 = -0.25
    #   seq_mean            (-3/3 + 2/1) / 2 = 0.5
    #   seq_sum_token_mean  (-3 + 2) / (2 sequences * L=4) = -0.125
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 7.0, math.inf]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    expected = {"token_mean": -0.25, "seq_mean": 0.5, "seq_sum_token_mean": -0.125}
    for aggregation, value in expected.items():
        cfg = GRPOLossConfig(aggregation=aggregation, norm_len=4)
        loss, _ = grpo_loss(logp, None, None, adv, mask, cfg)
        assert loss.item() == pytest.approx(value), aggregation


def test_entropy_metric_and_shape_errors():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, math.nan, 100.0]])
    _, metrics = grpo_loss(logp, None, None, torch.zeros(2), mask, GRPOLossConfig(), entropy=entropy)
    assert metrics["entropy"].item() == pytest.approx(2.5)  # (1 + 2 + 3 + 4) / 4
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, None, None, torch.zeros(3), mask, GRPOLossConfig())
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(logp, torch.zeros(2, 4), None, torch.zeros(2), mask, GRPOLossConfig())
    with pytest.raises(ValueError, match="num_global_tokens"):
        grpo_loss(logp, None, None, torch.zeros(2), mask, GRPOLossConfig(), num_global_tokens=0)


def random_case(n=6, num_tokens=5, seed=4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, num_tokens, generator=g, dtype=torch.float64) * 3  # [n, T]
    # log-ratios in [-0.8, 0.8]: ratios 0.45..2.2, both clip sides hit, away from the kinks by chance.
    logp = old + 1.6 * (torch.rand(n, num_tokens, generator=g, dtype=torch.float64) - 0.5)
    ref = old + 0.3 * torch.randn(n, num_tokens, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, num_tokens + 1, (n,), generator=g)
    mask = torch.arange(num_tokens)[None, :] < lengths[:, None]  # [n, T]
    return logp, old, ref, adv, mask


CONFIGS = [
    GRPOLossConfig(aggregation=a, norm_len=8, kl_beta=0.05, kl_estimator=k, clip_eps_high=0.28, dual_clip_c=1.4)
    for a in AGGREGATIONS
    for k in KL_ESTIMATORS
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.aggregation}-{c.kl_estimator}")
def test_gradcheck_fp64(cfg):
    logp, old, ref, adv, mask = random_case(n=3, num_tokens=4, seed=1)
    logp.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: grpo_loss(x, old, ref, adv, mask, cfg)[0], (logp,))


@pytest.mark.parametrize("cfg", CONFIGS[::3] + [GRPOLossConfig()], ids=lambda c: f"{c.aggregation}-{c.kl_beta}")
def test_split_batch_with_global_normalisers_matches_whole(cfg):
    logp, old, ref, adv, mask = random_case()
    whole = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(whole, old, ref, adv, mask, cfg)
    loss.backward()
    norms = dict(num_global_tokens=mask.sum(), num_global_sequences=mask.shape[0])

    # Data parallel: rows split in two; each half normalised by the global counts.
    parts = logp.clone().requires_grad_()
    rows = [slice(0, 2), slice(2, 6)]
    results = [grpo_loss(parts[r], old[r], ref[r], adv[r], mask[r], cfg, **norms) for r in rows]
    total = sum(loss_r for loss_r, _ in results)
    total.backward()
    torch.testing.assert_close(total, loss)
    torch.testing.assert_close(parts.grad, whole.grad)
    for name in ("clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl"):
        torch.testing.assert_close(sum(m[name] for _, m in results), metrics[name], msg=name)
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0  # both sides exercised

    # Context parallel: every sequence's tokens split in two; seq_mean also needs the global lengths.
    cols = logp.clone().requires_grad_()
    halves = [slice(0, 2), slice(2, 5)]
    norms["seq_num_tokens"] = mask.sum(dim=1)
    total = sum(
        grpo_loss(cols[:, c], old[:, c], ref[:, c], adv, mask[:, c], cfg, **norms)[0] for c in halves
    )
    total.backward()
    torch.testing.assert_close(total, loss)
    torch.testing.assert_close(cols.grad, whole.grad)


def test_truncated_importance_sampling_by_hand():
    """w = min(exp(old - engine), cap), no gradient; the policy-gradient term of each token is scaled by it."""
    old = torch.log(torch.tensor([[0.5, 0.4, 0.1]]))
    engine = torch.log(torch.tensor([[0.25, 0.4, 0.5]]))  # ratios 2, 1, 0.2
    w = truncated_is_weights(old, engine, 1.5)
    assert torch.allclose(w, torch.tensor([[1.5, 1.0, 0.2]])) and not w.requires_grad

    logp = old.clone().requires_grad_(True)
    adv, mask = torch.tensor([2.0]), torch.ones(1, 3)
    cfg = GRPOLossConfig(tis_cap=1.5)
    loss, metrics = grpo_loss(logp, old, None, adv, mask, cfg, engine_logp=engine)
    # at ratio 1 (old == logp) each token's surrogate is -A; weighted: -(1.5 + 1 + 0.2) * 2 / 3
    assert math.isclose(loss.item(), -(1.5 + 1.0 + 0.2) * 2 / 3, rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, -torch.tensor([[1.5, 1.0, 0.2]]) * 2 / 3, rtol=1e-6)
    assert math.isclose(metrics["tis_weight_mean"].item(), 2.7 / 3, rel_tol=1e-6)
    assert math.isclose(metrics["tis_clip_frac"].item(), 1 / 3, rel_tol=1e-6)
    plain, _ = grpo_loss(old, old, None, adv, mask, GRPOLossConfig(), engine_logp=engine)
    assert math.isclose(plain.item(), -2.0, rel_tol=1e-6)  # without tis_cap the engine log-probs change nothing
    with pytest.raises(ValueError, match="engine_logp: required when tis_cap"):
        grpo_loss(old, old, None, adv, mask, cfg)


def test_logprob_diff_by_hand_and_over_split_batches():
    engine = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.5, -0.5]])
    trainer = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -3.5, -0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = logprob_diff(engine, trainer, mask)
    assert math.isclose(out["mean"].item(), (0.5 + 0 + 0 + 3.0 + 0.1) / 5, rel_tol=1e-6)
    assert math.isclose(out["max"].item(), 3.0, rel_tol=1e-6)
    halves = [logprob_diff(engine[i : i + 1], trainer[i : i + 1], mask[i : i + 1], num_global_tokens=5) for i in (0, 1)]
    assert math.isclose(sum(h["mean"].item() for h in halves), out["mean"].item(), rel_tol=1e-6)
    assert max(h["max"].item() for h in halves) == out["max"].item()
    none = logprob_diff(engine, trainer, torch.zeros_like(mask))
    assert none["mean"].item() == 0.0 and none["max"].item() == 0.0


# ---------------------------------------------------------------------------------------------- #
# GSPO, CISPO, importance-weighted KL


def test_policy_loss_config_defaults_and_validation():
    cfg = GRPOLossConfig()
    assert (cfg.policy_loss, cfg.kl_importance_weight) == ("ppo", False)
    GRPOLossConfig(policy_loss="gspo", clip_eps_low=3e-4, clip_eps_high=4e-4)  # GSPO paper's ranges
    GRPOLossConfig(policy_loss="cispo", clip_eps_low=1.0, clip_eps_high=4.0)  # no lower bound on the weight
    GRPOLossConfig(policy_loss="gspo", dual_clip_c=3.0)
    bad = [
        (dict(policy_loss="trpo"), "policy_loss"),
        (dict(policy_loss="cispo", clip_eps_low=1.5), "clip_eps_low"),
        (dict(policy_loss="gspo", clip_eps_low=1.0), "clip_eps_low"),
        (dict(policy_loss="cispo", dual_clip_c=3.0), "dual_clip_c"),
        (dict(kl_importance_weight=1), "kl_importance_weight"),
    ]
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=field):
            GRPOLossConfig(**kwargs)


def gspo_case():
    """Sequence 0: log-ratios (ln 2, 0), A = +1; sequence 1: (-0.1, 0.1, 0), A = -2; padding holds nan."""
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    logp = old + torch.tensor([[LN2, 0.0, 0.0], [-0.1, 0.1, 0.0]], dtype=torch.float64)
    logp[0, 2] = math.nan
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    return logp.requires_grad_(), old, adv, mask


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_gspo_by_hand(aggregation):
    # s_0 = exp((ln 2 + 0) / 2) = sqrt 2 = 1.414214 > 1.28 with A > 0: clipped, loss -1.28 on both tokens, no grad.
    # s_1 = exp(0 / 3) = 1, A = -2: loss -min(-2, -2) = 2 on each of its 3 tokens; the sequence objective
    #   f(s) = -A s = 2 s has d f / d logp_t = 2 * s / len = 2/3 per token.
    # token_mean (5 tokens): (2 * -1.28 + 3 * 2) / 5 = 0.688, grad on sequence 1 = (1/5) * len * 2/3 = 0.4
    # seq_mean:              (-1.28 + 2) / 2 = 0.36,         grad on sequence 1 = (1/2) * 2/3 = 1/3
    logp, old, adv, mask = gspo_case()
    cfg = GRPOLossConfig(policy_loss="gspo", clip_eps_low=0.2, clip_eps_high=0.28, aggregation=aggregation)
    loss, metrics = grpo_loss(logp, old, None, adv, mask, cfg)
    expected_loss, g = {"token_mean": (0.688, 0.4), "seq_mean": (0.36, 1 / 3)}[aggregation]
    torch.testing.assert_close(loss, torch.tensor(expected_loss, dtype=torch.float64))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [g, g, g]], dtype=torch.float64))
    assert metrics["clip_frac_high"].item() == pytest.approx(0.4)  # the 2 tokens of sequence 0, of 5
    assert metrics["clip_frac_low"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx((2 * math.sqrt(2) + 3) / 5)


def gspo_sequence_form(logp, old, adv, mask, cfg):
    """Reference: GSPO written per sequence with autograd through the mean log-ratio; the per-sequence
    loss f(s_i) is then spread over the sequence's tokens and aggregated like any token loss."""
    m = mask.to(logp.dtype)
    lengths = m.sum(dim=1)
    s = torch.exp(torch.where(mask.bool(), logp - old, 0.0).sum(dim=1) / lengths)  # [n]
    f = -torch.minimum(s * adv, s.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * adv)  # [n]
    if cfg.dual_clip_c is not None:
        f = torch.where(adv < 0, torch.minimum(f, -cfg.dual_clip_c * adv), f)
    if cfg.aggregation == "token_mean":
        return (f * lengths).sum() / m.sum()
    if cfg.aggregation == "seq_mean":
        return f.mean()
    return (f * lengths).sum() / (logp.shape[0] * cfg.norm_len)


GSPO_CONFIGS = [
    GRPOLossConfig(policy_loss="gspo", aggregation=a, norm_len=8, clip_eps_low=0.05, clip_eps_high=0.08, dual_clip_c=dc)
    for a in AGGREGATIONS
    for dc in (None, 1.1)
]


@pytest.mark.parametrize("cfg", GSPO_CONFIGS, ids=lambda c: f"{c.aggregation}-{c.dual_clip_c}")
def test_gspo_equals_the_sequence_form_in_value_and_gradient(cfg):
    logp, old, _, adv, mask = random_case(n=12, num_tokens=5, seed=7)
    adv = adv.sign() * (adv.abs() + 0.1)
    mine = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(mine, old, None, adv, mask, cfg)
    loss.backward()
    ref = logp.clone().requires_grad_()
    expected = gspo_sequence_form(ref, old, adv, mask, cfg)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(mine.grad, torch.where(mask, ref.grad, 0.0))
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0  # both sides exercised


@pytest.mark.parametrize("cfg", GSPO_CONFIGS[::2], ids=lambda c: c.aggregation)
def test_gspo_context_parallel_halves_sum_to_the_whole(cfg):
    """Each sequence's tokens split over two CP ranks: with the all-reduced sum of log-ratios and the full
    lengths, the two partial losses (and gradients, and token-mean metrics) sum to the whole."""
    logp, old, ref, adv, mask = random_case(n=12, num_tokens=5, seed=7)
    cfg = dataclasses.replace(cfg, kl_beta=0.05)
    whole = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(whole, old, ref, adv, mask, cfg)
    loss.backward()

    cols = logp.clone().requires_grad_()
    halves = [slice(0, 2), slice(2, 5)]
    # the all-reduce (SUM over the CP group) of each rank's partial per-sequence sums
    seq_sum = sum(sequence_log_ratio_sum(logp[:, c], old[:, c], mask[:, c]) for c in halves)
    norms = dict(num_global_tokens=mask.sum(), num_global_sequences=mask.shape[0], seq_num_tokens=mask.sum(dim=1))
    results = [
        grpo_loss(cols[:, c], old[:, c], ref[:, c], adv, mask[:, c], cfg, seq_log_ratio_sum=seq_sum, **norms)
        for c in halves
    ]
    total = sum(r[0] for r in results)
    total.backward()
    torch.testing.assert_close(total, loss)
    torch.testing.assert_close(cols.grad, whole.grad)
    for name in ("clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl", "kl_ref"):
        torch.testing.assert_close(sum(m[name] for _, m in results), metrics[name], msg=name)
    # without the global sums a sharded sequence would use its local mean: refused
    with pytest.raises(ValueError, match="seq_log_ratio_sum"):
        grpo_loss(cols[:, :2], old[:, :2], ref[:, :2], adv, mask[:, :2], cfg, **norms)

    # data parallel: rows split, no sequence sharded
    rows = logp.clone().requires_grad_()
    parts = [slice(0, 5), slice(5, 12)]
    norms.pop("seq_num_tokens")
    total = sum(grpo_loss(rows[r], old[r], ref[r], adv[r], mask[r], cfg, **norms)[0] for r in parts)
    total.backward()
    torch.testing.assert_close(total, loss)
    torch.testing.assert_close(rows.grad, whole.grad)


def test_gspo_argument_errors():
    logp, old, adv, mask = gspo_case()
    with pytest.raises(ValueError, match="seq_log_ratio_sum: only used"):
        grpo_loss(logp, old, None, adv, mask, GRPOLossConfig(), seq_log_ratio_sum=torch.zeros(2))
    cfg = GRPOLossConfig(policy_loss="gspo")
    with pytest.raises(ValueError, match="seq_num_tokens: required"):
        grpo_loss(logp, old, None, adv, mask, cfg, seq_log_ratio_sum=torch.zeros(2))
    with pytest.raises(ValueError, match="seq_log_ratio_sum: expected"):
        grpo_loss(logp, old, None, adv, mask, cfg, seq_log_ratio_sum=torch.zeros(3), seq_num_tokens=torch.ones(2))
    # on-policy: every s_i is 1, the loss is -mean A
    loss, _ = grpo_loss(logp, None, None, adv, mask, cfg)
    assert loss.item() == pytest.approx(-(2 * 1.0 + 3 * -2.0) / 5)


def test_cispo_by_hand_gradient_is_the_clipped_weight_times_advantage():
    # Three one-token sequences, ratios r = 1.5, 0.5, 1.0 and A = +1, -2, +1; eps_low 0.2, eps_high 0.28:
    #   w = sg(clip(r, 0.8, 1.28)) = 1.28, 0.8, 1.0;  l = -w A logp;  d l / d logp = -w A = -1.28, 1.6, -1.0
    # token mean over 3: value -(1.28 logp_0 - 1.6 logp_1 + logp_2) / 3, gradient -w A / 3. The first token
    # is clipped high with A > 0, which PPO would give zero gradient; CISPO keeps it.
    old = torch.full((3, 1), -1.0, dtype=torch.float64)
    logp = (old + torch.tensor([[1.5], [0.5], [1.0]], dtype=torch.float64).log()).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64)
    mask = torch.ones(3, 1)
    cfg = GRPOLossConfig(policy_loss="cispo", clip_eps_low=0.2, clip_eps_high=0.28)
    loss, metrics = grpo_loss(logp, old, None, adv, mask, cfg)
    w = torch.tensor([1.28, 0.8, 1.0], dtype=torch.float64)
    lp = logp.detach()[:, 0]
    torch.testing.assert_close(loss, -(w * adv * lp).sum() / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad[:, 0], -w * adv / 3)
    assert metrics["clip_frac_high"].item() == pytest.approx(1 / 3)
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 3)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    # clip_eps_low = 1: no lower bound, the r = 0.5 token keeps weight 0.5
    logp.grad = None
    loss, _ = grpo_loss(logp, old, None, adv, mask, dataclasses.replace(cfg, clip_eps_low=1.0))
    loss.backward()
    torch.testing.assert_close(logp.grad[:, 0], -torch.tensor([1.28, 0.5, 1.0], dtype=torch.float64) * adv / 3)


def test_cispo_never_zeroes_a_gradient_and_matches_closed_form_on_random_data():
    logp, old, _, adv, mask = random_case(n=6, num_tokens=5, seed=3)
    x = logp.clone().requires_grad_()
    cfg = GRPOLossConfig(policy_loss="cispo", clip_eps_low=0.2, clip_eps_high=0.28, aggregation="seq_mean")
    loss, _ = grpo_loss(x, old, None, adv, mask, cfg)
    loss.backward()
    w = torch.exp(logp - old).clamp(0.8, 1.28)
    lengths = mask.sum(dim=1, keepdim=True)
    expected = torch.where(mask, -w * adv[:, None] / lengths / mask.shape[0], 0.0)
    torch.testing.assert_close(x.grad, expected)
    assert (x.grad[mask] != 0).all()


@pytest.mark.parametrize(
    "cfg",
    [GRPOLossConfig(policy_loss="gspo", aggregation=a, norm_len=8, kl_beta=0.05, kl_estimator=k, clip_eps_high=0.28,
                    dual_clip_c=1.4) for a in AGGREGATIONS for k in ("k1", "k3")],
    ids=lambda c: f"{c.aggregation}-{c.kl_estimator}",
)
def test_gradcheck_fp64_gspo(cfg):
    """GSPO's per-token gradient is the true derivative of its (sequence-form) value. CISPO and the
    importance-weighted KL are not gradchecked: their detached weights make the gradient differ from the
    value's derivative by design; their closed-form gradients are tested above and below."""
    logp, old, ref, adv, mask = random_case(n=3, num_tokens=4, seed=1)
    logp.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: grpo_loss(x, old, ref, adv, mask, cfg)[0], (logp,))


def test_cispo_split_batch_matches_whole():
    logp, old, ref, adv, mask = random_case()
    cfg = GRPOLossConfig(policy_loss="cispo", aggregation="seq_mean", kl_beta=0.05)
    whole = logp.clone().requires_grad_()
    loss, _ = grpo_loss(whole, old, ref, adv, mask, cfg)
    loss.backward()
    cols = logp.clone().requires_grad_()
    norms = dict(num_global_tokens=mask.sum(), num_global_sequences=mask.shape[0], seq_num_tokens=mask.sum(dim=1))
    total = sum(grpo_loss(cols[:, c], old[:, c], ref[:, c], adv, mask[:, c], cfg, **norms)[0]
                for c in (slice(0, 2), slice(2, 5)))
    total.backward()
    torch.testing.assert_close(total, loss)
    torch.testing.assert_close(cols.grad, whole.grad)


def test_importance_weighted_kl_is_unbiased_under_the_old_policy_by_enumeration():
    """One step over a 5-token vocabulary: the exact expectation under pi_old (a weighted sum over every
    token, no sampling) of the weighted estimator is KL(pi || ref); of the unweighted k3 it is not."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, generator=g, dtype=torch.float64)
    old, logp, ref = torch.log_softmax(logits, dim=-1).unbind()  # [5] each
    exact = (logp.exp() * (logp - ref)).sum()  # KL(pi || ref)
    p_old = old.exp()
    for estimator in ("k1", "k3"):
        weighted = kl_penalty(logp, ref, estimator, old_logp=old)
        torch.testing.assert_close((p_old * weighted).sum(), exact, msg=estimator)
    plain = (p_old * kl_penalty(logp, ref, "k3")).sum()
    assert abs(plain - exact) > 1e-2
    # and the unweighted k3 is exact on-policy (expectation under pi itself)
    torch.testing.assert_close((logp.exp() * kl_penalty(logp, ref, "k3")).sum(), exact)


def test_importance_weighted_kl_in_the_loss_by_hand():
    # One token: logp = 0, old = -ln 2 (r = 2, detached weight), ref = ln 2: k3 = 0.306853, weighted 0.613706;
    # d k3 / d logp = 1 - e^(ref - logp) = -1, weighted -2. A = 0, beta = 0.1: loss 0.0613706, grad -0.2.
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    old = torch.full((1, 1), -LN2, dtype=torch.float64)
    ref = torch.full((1, 1), LN2, dtype=torch.float64)
    adv, mask = torch.zeros(1, dtype=torch.float64), torch.ones(1, 1)
    cfg = GRPOLossConfig(kl_beta=0.1, kl_importance_weight=True)
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, cfg)
    torch.testing.assert_close(loss, torch.tensor(0.0613706, dtype=torch.float64), atol=1e-7, rtol=0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.2]], dtype=torch.float64))
    assert metrics["kl_ref"].item() == pytest.approx(0.613706, abs=1e-6)
    # unweighted: half of that; on-policy (old = None): the weight is 1
    plain, _ = grpo_loss(logp, old, ref, adv, mask, GRPOLossConfig(kl_beta=0.1))
    assert plain.item() == pytest.approx(0.0306853, abs=1e-7)
    on_policy, _ = grpo_loss(logp, None, ref, adv, mask, cfg)
    assert on_policy.item() == pytest.approx(0.0306853, abs=1e-7)
