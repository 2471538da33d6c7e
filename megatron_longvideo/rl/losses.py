"""GRPO policy loss: PPO clipped surrogate (DAPO clip-higher, optional dual clip), GSPO or CISPO + KL to a reference.

Per response token t of sequence i, with ``r_it = exp(logp_it - old_logp_it)`` and advantage ``A_i``
(``sg`` = stop-gradient), the policy-gradient term ``pg_it`` of ``policy_loss``:

    ppo    pg_it = -min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i)
           dual clip (c > 1, A_i < 0 only):  pg_it = min(pg_it, -c * A_i)
    gspo   GSPO (Zheng et al. 2025), sequence form: one ratio and one clip per sequence,
               s_i   = exp((1 / len_i) * sum_t (logp_it - old_logp_it))
               pg_it = -min(s_i * A_i, clip(s_i, 1 - eps_low, 1 + eps_high) * A_i)   on every token t of i
           (dual clip as for ppo, on s_i). The paper's clip ranges are tiny (eps_low = 3e-4, eps_high = 4e-4).
    cispo  CISPO (MiniMax-M1): pg_it = -sg(clip(r_it, 1 - eps_low, 1 + eps_high)) * A_i * logp_it,
           the REINFORCE gradient weighted by the clipped, detached ratio: no token's gradient is zeroed.
           ``clip_eps_low = 1`` leaves the weight unbounded below (the paper tunes only eps_high). Its value
           contains ``logp`` itself, so it is not comparable with the ppo/gspo loss values.

    kl_it = k(logp, ref_logp), with d = ref_logp - logp:
            k1 = -d      k2 = d^2 / 2      k3 = exp(d) - d - 1
    importance-weighted (``kl_importance_weight``, tokens sampled from the old policy):
            kl_it = sg(r_it) * k(logp, ref_logp), so E_old[kl_it] = E_policy[k]; for k3 that is KL(policy || ref)
            exactly (unweighted, k3 averaged under the old policy is biased once policy != old)
    l_it  = pg_it + beta * kl_it

GSPO's gradient is written per token as GSPO-token does it, ``s_it = sg(s_i) * exp(logp_it - sg(logp_it))``
(value s_i, d s_it / d logp_it = s_i). With a sequence-constant advantage ([n] advantages) and an
aggregation whose weight is constant within a sequence (all three below), value and gradient equal the
sequence form's exactly (``d/d logp_it`` of ``w_i * len_i * f(s_i)`` is ``w_i * f'(s_i) * s_i``); [n, T]
advantages give GSPO-token. Written so, a token's gradient needs only its own log-prob and the detached
per-sequence sum ``S_i = sum_t (logp_it - old_logp_it)``: a sequence sharded over context-parallel ranks
needs that sum over all its ranks (:func:`sequence_log_ratio_sum`, all-reduced SUM over the CP group,
passed as ``seq_log_ratio_sum``) and its full length ``seq_num_tokens``; no autograd through a collective.
With ``tis_cap`` the value is still the sequence form's, but each token's gradient carries its own TIS weight
(GSPO-token's reading); the sequence form, as TRL 0.25 computes it, spreads the sequence's gradient with the
sequence's mean weight instead (the per-sequence sums of the gradient agree).

Aggregation over the response mask m (``L`` = ``norm_len``):

    token_mean          sum_it m l / N_tokens                        (DAPO: every token weighs the same)
    seq_mean            sum_i (sum_t m l / len_i) / N_seqs            (GRPO paper: every sequence weighs the same)
    seq_sum_token_mean  sum_it m l / (N_seqs * L)                     (Dr.GRPO: constant normaliser, no length bias)

Rollout-engine mismatch (the engine samples with its own kernels, dtype and possibly fewer frames, so its
log-probs ``e_it`` differ from the trainer's ``o_it`` under the same weights): truncated importance
sampling weighs each policy-gradient term by ``w_it = min(exp(o_it - e_it), tis_cap)`` (no gradient), and
:func:`logprob_diff` reports mean and max ``|e_it - o_it|``.

Every aggregate is a sum over local tokens divided by normalisers that the caller may pass for the
*global* batch (``num_global_tokens``, ``num_global_sequences``, and ``seq_num_tokens`` = len_i of
sequences sharded over context-parallel ranks). Then the rank-local losses sum to the single-rank
loss, and so do their gradients; the token-mean metrics are built the same way, so an all-reduce
SUM of each metric gives its global value. Without them, the local batch is the whole batch.
"""

from __future__ import annotations

import dataclasses
import math

import torch

AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum_token_mean")
KL_ESTIMATORS = ("k1", "k2", "k3")
POLICY_LOSSES = ("ppo", "gspo", "cispo")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOLossConfig:
    """Hyper-parameters of ``grpo_loss``; validated on construction."""

    policy_loss: str = "ppo"
    """Policy-gradient term: "ppo" (token ratio, token clip), "gspo" (sequence ratio, sequence clip) or
    "cispo" (clipped detached ratio times A * logp); module doc."""
    clip_eps_low: float = 0.2
    """Lower clip range: the ratio is clipped at ``1 - clip_eps_low`` (in [0, 1); [0, 1] for cispo, where 1
    means no lower bound). GSPO's paper uses 3e-4."""
    clip_eps_high: float = 0.2
    """Upper clip range: the ratio is clipped at ``1 + clip_eps_high`` (>= 0); DAPO's clip-higher uses 0.28,
    GSPO's paper 4e-4."""
    dual_clip_c: float | None = None
    """Dual-clip bound c > 1 on the loss of negative-advantage tokens (``-c * A``); None disables it.
    Not with cispo (its weight is already bounded by ``1 + clip_eps_high``)."""
    kl_beta: float = 0.0
    """Weight of the KL-to-reference term (>= 0). 0 disables it and the reference pass (``needs_reference``)."""
    kl_estimator: str = "k3"
    """KL estimator: "k1" (logp - ref), "k2" ((logp - ref)^2 / 2) or "k3" (exp(ref - logp) - (ref - logp) - 1)."""
    kl_importance_weight: bool = False
    """Weigh each token's KL estimate by its detached ratio ``exp(logp - old_logp)``: unbiased when the tokens
    were sampled from the old policy (off-policy minibatches); the ``kl_ref`` metric is then weighted too."""
    aggregation: str = "token_mean"
    """How token losses become one scalar: "token_mean", "seq_mean" or "seq_sum_token_mean" (module doc)."""
    norm_len: int | None = None
    """Constant per-sequence normaliser L of "seq_sum_token_mean" (e.g. the generation budget); required there."""
    max_log_ratio: float = 20.0
    """Log-ratios (policy/old, reference/policy) are clamped to +-max_log_ratio before exp, so they cannot overflow."""
    tis_cap: float | None = None
    """Truncated importance sampling: policy-gradient terms weighted by ``min(exp(old - engine), tis_cap)``,
    the trainer-old over rollout-engine probability ratio (> 0; 2 is a common choice). None: no correction."""

    def __post_init__(self):
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss: {self.policy_loss!r} is not one of {POLICY_LOSSES}")
        if self.policy_loss == "cispo":
            if not 0.0 <= self.clip_eps_low <= 1.0:
                raise ValueError(f"clip_eps_low: must be in [0, 1] for cispo, got {self.clip_eps_low}")
        elif not 0.0 <= self.clip_eps_low < 1.0:
            raise ValueError(f"clip_eps_low: must be in [0, 1), got {self.clip_eps_low}")
        if not 0.0 <= self.clip_eps_high < math.inf:
            raise ValueError(f"clip_eps_high: must be finite and >= 0, got {self.clip_eps_high}")
        if self.dual_clip_c is not None and not 1.0 < self.dual_clip_c < math.inf:
            raise ValueError(f"dual_clip_c: must be finite and > 1 (or None), got {self.dual_clip_c}")
        if self.dual_clip_c is not None and self.policy_loss == "cispo":
            raise ValueError("dual_clip_c: does not apply to policy_loss='cispo'; leave it None")
        if not isinstance(self.kl_importance_weight, bool):
            raise ValueError(f"kl_importance_weight: must be a bool, got {self.kl_importance_weight!r}")
        if not 0.0 <= self.kl_beta < math.inf:
            raise ValueError(f"kl_beta: must be finite and >= 0, got {self.kl_beta}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator: {self.kl_estimator!r} is not one of {KL_ESTIMATORS}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: {self.aggregation!r} is not one of {AGGREGATIONS}")
        if self.aggregation == "seq_sum_token_mean" and (self.norm_len is None or self.norm_len <= 0):
            raise ValueError(f"norm_len: seq_sum_token_mean needs a positive norm_len, got {self.norm_len}")
        if not 0.0 < self.max_log_ratio < math.inf:
            raise ValueError(f"max_log_ratio: must be finite and > 0, got {self.max_log_ratio}")
        if self.tis_cap is not None and not 0.0 < self.tis_cap < math.inf:
            raise ValueError(f"tis_cap: must be finite and > 0 (or None), got {self.tis_cap}")


def needs_reference(cfg: GRPOLossConfig) -> bool:
    """Whether the trainer must compute reference log-probs (only when the KL term is on)."""
    return cfg.kl_beta > 0.0


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, *, max_log_ratio: float = 20.0,
               old_logp: torch.Tensor | None = None):
    """Per-token estimate of KL(policy || reference) from samples of the policy; see module doc.

    With ``old_logp`` (tokens sampled from the old policy) each estimate is multiplied by the detached
    ratio ``exp(logp - old_logp)``, which makes its expectation under the old policy the on-policy one."""
    d = (ref_logp - logp).clamp(-max_log_ratio, max_log_ratio)  # [n, T]
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        kl = torch.exp(d) - d - 1.0
    else:
        raise ValueError(f"kl_estimator: {estimator!r} is not one of {KL_ESTIMATORS}")
    if old_logp is None:
        return kl
    weight = torch.exp((logp.detach() - old_logp.detach()).clamp(-max_log_ratio, max_log_ratio))  # [n, T]
    return weight * kl


def clipped_surrogate(logp, old_logp, advantages, cfg: GRPOLossConfig):
    """Per-token PPO loss [n, T] and the masks of tokens clipped low / high / by the dual clip.

    A clipped token's loss is constant in ``logp`` (zero gradient): low side = A < 0 and
    r < 1 - eps_low; high side = A > 0 and r > 1 + eps_high; dual = A < 0 and r > c.
    """
    ratio = torch.exp((logp - old_logp).clamp(-cfg.max_log_ratio, cfg.max_log_ratio))  # [n, T]
    return _ppo_clip(ratio, advantages, cfg)


def sequence_log_ratio_sum(logp: torch.Tensor, old_logp: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """[n] detached ``sum_t m_it (logp_it - old_logp_it)`` over the local tokens of each sequence (padding
    may hold garbage). Under context parallelism, all-reduce it (SUM over the CP group) and pass the result
    to :func:`grpo_loss` as ``seq_log_ratio_sum`` for ``policy_loss="gspo"``; ``old_logp=None``: zeros."""
    keep = mask.bool()
    if old_logp is None:
        return logp.new_zeros(logp.shape[0]).detach()
    return torch.where(keep, logp.detach() - old_logp.detach(), 0.0).sum(dim=1)  # [n]


def gspo_surrogate(logp, old_logp, advantages, mask, cfg: GRPOLossConfig, *,
                   seq_log_ratio_sum: torch.Tensor | None = None, seq_num_tokens: torch.Tensor | None = None):
    """Per-token GSPO loss [n, T] (sequence form, module doc), the sequence ratio on each token [n, T], and
    the clip masks (those of :func:`clipped_surrogate`, evaluated on s_i: every token of a clipped sequence).

    ``logp``/``old_logp`` must be zero (or finite) under ``mask == 0``. ``seq_log_ratio_sum`` [n]: the
    per-sequence sum of log-ratios over the whole (CP-sharded) sequence, with ``seq_num_tokens`` [n] its
    full length; without them the local tokens are the whole sequence.
    """
    m = mask.to(logp.dtype)  # [n, T]
    n = logp.shape[0]
    if seq_log_ratio_sum is not None:
        if seq_num_tokens is None:
            raise ValueError("seq_num_tokens: required with seq_log_ratio_sum (the full length of each sequence)")
        if seq_log_ratio_sum.shape != (n,):
            raise ValueError(f"seq_log_ratio_sum: expected shape ({n},), got {tuple(seq_log_ratio_sum.shape)}")
        total = seq_log_ratio_sum.detach().to(logp.dtype)  # [n]
    else:
        total = sequence_log_ratio_sum(logp, old_logp, mask).to(logp.dtype)  # [n]
    lengths = m.sum(dim=1) if seq_num_tokens is None else seq_num_tokens.to(logp.dtype)  # [n]
    if lengths.shape != (n,):
        raise ValueError(f"seq_num_tokens: expected shape ({n},), got {tuple(lengths.shape)}")
    if seq_log_ratio_sum is None and seq_num_tokens is not None and not torch.equal(lengths, m.sum(dim=1)):
        raise ValueError("seq_log_ratio_sum: required for policy_loss='gspo' when sequences are sharded "
                         "(seq_num_tokens differs from the local mask's lengths); all-reduce sequence_log_ratio_sum")
    mean = total / lengths.clamp(min=1.0)  # [n] (1/len_i) S_i
    inside = (mean.abs() <= cfg.max_log_ratio).to(logp.dtype)[:, None]  # clamp's gradient: 0 outside
    mean = mean.clamp(-cfg.max_log_ratio, cfg.max_log_ratio)
    # value s_i on every token; d/d logp_it = s_i (module doc)
    log_ratio = mean[:, None] + inside * (logp - logp.detach())  # [n, T]
    return _ppo_clip(torch.exp(log_ratio), advantages, cfg)


def cispo_surrogate(logp, old_logp, advantages, cfg: GRPOLossConfig):
    """Per-token CISPO loss ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp`` [n, T], the ratio r, and the
    masks of tokens whose weight was truncated: low = r < 1 - eps_low, high = r > 1 + eps_high (whatever the
    sign of A: the weight is bounded either way, and the token keeps its gradient ``-w * A``)."""
    ratio = torch.exp((logp.detach() - old_logp.detach()).clamp(-cfg.max_log_ratio, cfg.max_log_ratio))  # [n, T]
    weight = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)  # [n, T], no gradient
    loss = -weight * advantages * logp  # [n, T]
    masks = {
        "clip_frac_low": ratio < 1.0 - cfg.clip_eps_low,
        "clip_frac_high": ratio > 1.0 + cfg.clip_eps_high,
    }
    return loss, ratio, masks


def _ppo_clip(ratio, advantages, cfg: GRPOLossConfig):
    """-min(r A, clip(r) A) (and the dual clip) of given ratios [n, T]; see :func:`clipped_surrogate`."""
    clipped = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)  # [n, T]
    neg = advantages < 0
    masks = {
        "clip_frac_low": neg & (ratio < 1.0 - cfg.clip_eps_low),
        "clip_frac_high": (advantages > 0) & (ratio > 1.0 + cfg.clip_eps_high),
    }
    if cfg.dual_clip_c is not None:
        loss = torch.where(neg, torch.minimum(loss, -cfg.dual_clip_c * advantages), loss)
        masks["dual_clip_frac"] = neg & (ratio > cfg.dual_clip_c)
    return loss, ratio, masks


def truncated_is_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float, *,
                         max_log_ratio: float = 20.0) -> torch.Tensor:
    """``min(exp(old_logp - engine_logp), cap)`` per token, without gradient: the trainer-old over engine
    probability ratio of each sampled token, truncated at ``cap``."""
    log_ratio = (old_logp.detach() - engine_logp.detach()).clamp(-max_log_ratio, max_log_ratio)
    return torch.exp(log_ratio).clamp(max=cap)


def logprob_diff(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor, *,
                 num_global_tokens: float | None = None) -> dict[str, torch.Tensor]:
    """``{"mean": sum m |e - o| / N_tokens, "max": max over m of |e - o|}`` (detached). With the global
    token count, an all-reduce SUM of ``mean`` and MAX of ``max`` over ranks gives the global values; no
    masked token gives 0 for both."""
    keep = mask.bool()
    diff = torch.where(keep, (engine_logp.detach() - trainer_logp.detach()).abs(), 0.0)  # [n, T]
    m = keep.to(diff.dtype)
    return {"mean": _token_mean(diff, m, num_global_tokens), "max": diff.max() if diff.numel() else diff.new_zeros(())}


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOLossConfig,
    *,
    num_global_tokens: float | None = None,
    num_global_sequences: float | None = None,
    seq_num_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One scalar from per-token ``loss`` [n, T] under float ``mask`` [n, T] (``cfg.aggregation``)."""
    if cfg.aggregation == "token_mean":
        return (loss * mask).sum() / _token_count(mask, num_global_tokens)
    num_seqs = _positive("num_global_sequences", num_global_sequences, default=loss.shape[0])
    if cfg.aggregation == "seq_mean":
        lengths = mask.sum(dim=1) if seq_num_tokens is None else seq_num_tokens.to(loss.dtype)  # [n]
        if lengths.shape != (loss.shape[0],):
            raise ValueError(f"seq_num_tokens: expected shape ({loss.shape[0]},), got {tuple(lengths.shape)}")
        return ((loss * mask).sum(dim=1) / lengths.clamp(min=1.0)).sum() / num_seqs
    return (loss * mask).sum() / (num_seqs * cfg.norm_len)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOLossConfig,
    *,
    entropy: torch.Tensor | None = None,
    engine_logp: torch.Tensor | None = None,
    num_global_tokens: float | None = None,
    num_global_sequences: float | None = None,
    seq_num_tokens: torch.Tensor | None = None,
    seq_log_ratio_sum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss (scalar) and detached scalar metrics.

    ``logp``, ``old_logp``, ``ref_logp``, ``mask``, ``entropy``: [n, T] per response token (values
    under mask == 0 are ignored, even inf/nan, and get zero gradient); ``advantages``: [n] or [n, T].
    ``old_logp=None`` means on-policy (old = logp.detach(), ratio 1). ``ref_logp`` is required when
    ``cfg.kl_beta > 0`` and otherwise only used for the ``kl_ref`` metric. ``engine_logp`` [n, T]: the
    rollout engine's log-probs of the sampled tokens, required when ``cfg.tis_cap`` is set (the
    policy-gradient terms are then weighted by :func:`truncated_is_weights` of the old log-probs).
    Normalisers: module doc. ``seq_log_ratio_sum`` [n] (``policy_loss="gspo"`` only): the all-reduced
    :func:`sequence_log_ratio_sum` of sequences sharded over context-parallel ranks, with ``seq_num_tokens``.

    Metrics: loss, pg_loss, kl_loss, kl_ref, clip_frac_low, clip_frac_high, dual_clip_frac,
    approx_kl (k3 of the policy vs the old policy), ratio_mean, entropy, tis_weight_mean, tis_clip_frac
    (each when it applies). All are token means: for gspo, ``ratio_mean`` averages s_i over tokens and the
    clip fractions count the tokens of clipped sequences; for cispo they count truncated weights (any sign).
    """
    if logp.dim() != 2:
        raise ValueError(f"logp: expected [n, T], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask), ("entropy", entropy),
                    ("engine_logp", engine_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name}: expected shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    if advantages.shape == logp.shape[:1]:
        advantages = advantages.unsqueeze(1)  # [n, 1]
    elif advantages.shape != logp.shape:
        raise ValueError(
            f"advantages: expected [n] or [n, T] for logp {tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )
    if cfg.kl_beta > 0 and ref_logp is None:
        raise ValueError("ref_logp: required when kl_beta > 0")
    if cfg.tis_cap is not None and engine_logp is None:
        raise ValueError("engine_logp: required when tis_cap is set (the rollout engine's log-probs of the sampled tokens)")
    if seq_log_ratio_sum is not None and cfg.policy_loss != "gspo":
        raise ValueError(f"seq_log_ratio_sum: only used by policy_loss='gspo', not {cfg.policy_loss!r}")

    keep = mask.bool()
    m = keep.to(logp.dtype)  # [n, T]
    # Padding positions may hold garbage (inf/nan); zero them so no nan reaches values or gradients.
    logp = torch.where(keep, logp, 0.0)
    old_logp = logp.detach() if old_logp is None else torch.where(keep, old_logp.detach(), 0.0)
    advantages = advantages.detach().to(logp.dtype)
    norms = dict(
        num_global_tokens=num_global_tokens,
        num_global_sequences=num_global_sequences,
        seq_num_tokens=seq_num_tokens,
    )

    if cfg.policy_loss == "gspo":
        pg_tok, ratio, clip_masks = gspo_surrogate(logp, old_logp, advantages, keep, cfg,
                                                   seq_log_ratio_sum=seq_log_ratio_sum,
                                                   seq_num_tokens=seq_num_tokens)  # [n, T]
    elif cfg.policy_loss == "cispo":
        pg_tok, ratio, clip_masks = cispo_surrogate(logp, old_logp, advantages, cfg)  # [n, T]
    else:
        pg_tok, ratio, clip_masks = clipped_surrogate(logp, old_logp, advantages, cfg)  # [n, T]
    tis = None
    if cfg.tis_cap is not None:
        engine_logp = torch.where(keep, engine_logp.detach(), 0.0)
        tis = truncated_is_weights(old_logp, engine_logp, cfg.tis_cap, max_log_ratio=cfg.max_log_ratio)  # [n, T]
        pg_tok = tis * pg_tok
    loss_tok = pg_tok
    metrics: dict[str, torch.Tensor] = {"pg_loss": aggregate(pg_tok, m, cfg, **norms)}
    if ref_logp is not None:
        ref_logp = torch.where(keep, ref_logp.detach(), 0.0)
        kl_tok = kl_penalty(logp, ref_logp, cfg.kl_estimator, max_log_ratio=cfg.max_log_ratio,
                            old_logp=old_logp if cfg.kl_importance_weight else None)  # [n, T]
        metrics["kl_ref"] = _token_mean(kl_tok, m, num_global_tokens)
        if cfg.kl_beta > 0:
            kl_loss = aggregate(kl_tok, m, cfg, **norms)
            metrics["kl_loss"] = kl_loss
            loss_tok = pg_tok + cfg.kl_beta * kl_tok
    loss = aggregate(loss_tok, m, cfg, **norms)

    metrics["loss"] = loss
    with torch.no_grad():
        for name, hit in clip_masks.items():
            metrics[name] = _token_mean(hit.to(m.dtype), m, num_global_tokens)
        approx_kl = kl_penalty(logp, old_logp, "k3", max_log_ratio=cfg.max_log_ratio)  # [n, T]
        metrics["approx_kl"] = _token_mean(approx_kl, m, num_global_tokens)
        metrics["ratio_mean"] = _token_mean(ratio, m, num_global_tokens)
        if entropy is not None:
            metrics["entropy"] = _token_mean(torch.where(keep, entropy, 0.0), m, num_global_tokens)
        if tis is not None:
            metrics["tis_weight_mean"] = _token_mean(tis, m, num_global_tokens)
            metrics["tis_clip_frac"] = _token_mean((tis >= cfg.tis_cap).to(m.dtype), m, num_global_tokens)
    return loss, {k: v.detach() for k, v in metrics.items()}


def _token_count(mask: torch.Tensor, num_global_tokens: float | None) -> torch.Tensor | float:
    if num_global_tokens is None:
        return mask.sum().clamp(min=1.0)
    return _positive("num_global_tokens", num_global_tokens, default=None)


def _token_mean(x: torch.Tensor, mask: torch.Tensor, num_global_tokens: float | None) -> torch.Tensor:
    return (x * mask).sum() / _token_count(mask, num_global_tokens)


def _positive(name: str, value, *, default):
    if value is None:
        return default
    if float(value) <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")
    return value
