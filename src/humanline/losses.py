"""Losses for DPO, KTO, GRPO and SFT, normal and humanline: pure functions of per-token log-probs.

Conventions (see docs/DESIGN.md and METHOD.md):

* log-prob tensors are per token, ``[B, T]`` float; ``mask`` tensors are bool ``[B, T]``, True on
  response tokens;
* values where the mask is False are arbitrary (NaN, inf, ...) and never influence a result, a
  gradient or a metric: inputs pass through ``torch.where`` before any arithmetic, so garbage is
  never multiplied by 0;
* the humanline transform is one function, :func:`humanline_clip`, used by every loss through the
  ``humanline`` argument: ``None`` (normal loss) or ``(log_eps_P, log_eps_R)``;
* every loss returns :class:`LossOutput`: a scalar, differentiable ``loss``, the per-sequence terms
  ``per_example`` and ``metrics`` (detached 0-d tensors, TRL-style names, over the local batch).

Gradient accumulation and several processes: each loss takes an optional denominator
(``batch_denominator``, ``token_denominator``, ``sequence_denominator``) that replaces the local
count in its mean. A trainer that passes the *global* count (over micro-batches and processes) and
sums the resulting losses gets exactly the gradient of the full-batch loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GRPO_LOSS_TYPES",
    "LossOutput",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "humanline_clip",
    "humanline_reject_mask",
    "kto_loss",
    "sft_loss",
    "unclamped_fraction",
    "validate_humanline",
]

GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


@dataclass
class LossOutput:
    """A loss value with its per-sequence terms and detached metrics."""

    loss: Tensor
    per_example: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------- humanline transform

def validate_humanline(humanline: tuple[float, float] | None) -> tuple[float, float] | None:
    """Check ``humanline``: ``None`` or a pair ``(log_eps_P, log_eps_R)`` with ``log_eps_P < log_eps_R``.

    Returns it as a tuple of floats. Infinite bounds are allowed (``(-inf, inf)`` makes the clamp
    the identity). Raises ``ValueError`` otherwise.
    """
    if humanline is None:
        return None
    try:
        lo, hi = (float(v) for v in humanline)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(
            f"humanline must be None or a pair (log_eps_P, log_eps_R), got {humanline!r}"
        ) from None
    if not lo < hi:  # also rejects NaN
        raise ValueError(f"humanline bounds need log_eps_P < log_eps_R, got ({lo}, {hi})")
    return lo, hi


def humanline_clip(logratio: Tensor, log_eps_P: float, log_eps_R: float) -> Tensor:
    """Humanline clipping: ``l~ = clamp(l, log_eps_P, log_eps_R)``.

    A clamp, not a mask: the value saturates at the bound and the gradient is exactly zero strictly
    outside ``(log_eps_P, log_eps_R)`` (``torch.clamp``'s backward passes the gradient only where
    the input lies in the closed band).
    """
    return torch.clamp(logratio, min=log_eps_P, max=log_eps_R)


def unclamped_fraction(logratio: Tensor, mask: Tensor, log_eps_P: float, log_eps_R: float) -> Tensor:
    """Fraction of masked tokens with log-ratio strictly inside ``(log_eps_P, log_eps_R)`` (0-d).

    The authors' diagnostic. At step 0 of humanline syncing every ``l_t`` is exactly 0, which is
    strictly inside the band whenever ``log_eps_P < 0 < log_eps_R``: the fraction then reads 1
    (not 0). An empty mask reads 0. Detached.
    """
    inside, count = _unclamped_counts(logratio, mask, log_eps_P, log_eps_R)
    return inside / count.clamp(min=1)


def _unclamped_counts(logratio: Tensor, mask: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    l = logratio.detach()
    # comparisons with NaN are False and the mask is and-ed in, so garbage cannot count
    inside = (mask & (l > lo) & (l < hi)).sum().to(torch.float32)
    return inside, mask.sum().to(torch.float32)


def humanline_reject_mask(
    logratio: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    generator: torch.Generator | None = None,
    two_sided: bool = True,
) -> Tensor:
    """The authors' earlier stochastic humanline ("reject" mode): ``mask`` with some tokens dropped.

    Per token draw ``b ~ Beta(gamma, 1)`` and drop the token when ``exp(l_t) < M * b``, ``M`` the
    batch max of ``exp(l_t)`` over masked tokens. With ``two_sided`` also drop it when
    ``exp(-l_t) < M' * b'`` (``M'`` the batch max of ``exp(-l_t)``, ``b'`` an independent draw).
    Small ``gamma`` keeps almost everything (``b`` near 0); large ``gamma`` drops all but the
    tokens near the max (``b`` near 1); one-sided, the max-ratio token is never dropped. Computed
    without gradient, seeded by ``generator`` (on ``logratio``'s device). Returns a bool tensor.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    with torch.no_grad():
        if not bool(mask.any()):
            return mask.clone()
        l = torch.where(mask, logratio.detach().float(), 0.0)
        keep = mask.clone()
        for s in ((l, -l) if two_sided else (l,)):
            log_m = torch.where(mask, s, -math.inf).max()
            # Beta(gamma, 1) by inversion: b = u^(1/gamma), log b = log(u) / gamma (u = 0: -inf, keep)
            u = torch.rand(l.shape, generator=generator, device=l.device, dtype=torch.float32)
            log_b = torch.log(u) / gamma
            # exp(s) < M * b  <=>  s < log M + log b; in log space so that nothing overflows
            keep &= ~(s < log_m + log_b)
        return keep


# ---------------------------------------------------------------------------------------- helpers

def _fill(x: Tensor, mask: Tensor) -> Tensor:
    # where() rather than a product: NaN/inf outside the mask never reaches values or gradients
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _logratios(policy: Tensor, ref: Tensor, mask: Tensor,
               humanline: tuple[float, float] | None) -> tuple[Tensor, Tensor]:
    """(raw ``l_t``, ``l_t`` used by the loss), both 0 off the mask; the second clipped if humanline."""
    raw = _fill(policy, mask) - _fill(ref, mask)
    if humanline is None:
        return raw, raw
    # fill again after the clamp: a band that excludes 0 would turn padding into a bound value
    return raw, _fill(humanline_clip(raw, *humanline), mask)


def _mean(x: Tensor) -> Tensor:
    return x.detach().float().mean() if x.numel() else torch.zeros((), device=x.device)


def _abs_mean(raws: list[Tensor], masks: list[Tensor]) -> Tensor:
    total = torch.stack([r.detach().abs().float().sum() for r in raws]).sum()
    count = torch.stack([m.sum() for m in masks]).sum()
    return total / count.clamp(min=1)


def _unclamped_metric(raws: list[Tensor], masks: list[Tensor], hl: tuple[float, float]) -> Tensor:
    counts = [_unclamped_counts(r, m, *hl) for r, m in zip(raws, masks)]
    inside = torch.stack([i for i, _ in counts]).sum()
    total = torch.stack([c for _, c in counts]).sum()
    return inside / total.clamp(min=1)


def _denominator(default: int | Tensor, override: float | None) -> float | Tensor:
    if override is not None:
        if not override > 0:
            raise ValueError(f"a loss denominator must be > 0, got {override}")
        return override
    # an empty local batch gives loss 0, not NaN
    return default.clamp(min=1) if isinstance(default, Tensor) else max(default, 1)


# ----------------------------------------------------------------------------------------- losses

def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    beta: float = 0.1,
    humanline: tuple[float, float] | None = None,
    batch_denominator: float | None = None,
) -> LossOutput:
    """DPO (Rafailov et al. 2023), optionally humanline.

    ``r(x, y) = beta * sum_t l_t`` over response tokens (no length normalisation), ``l_t`` clipped
    by :func:`humanline_clip` under humanline; per pair ``-log sigmoid(r_chosen - r_rejected)``;
    loss = sum over pairs / ``batch_denominator`` (default: the number of pairs B).
    ``per_example`` is the per-pair loss [B].
    """
    hl = validate_humanline(humanline)
    raw_c, l_c = _logratios(policy_chosen_logps, ref_chosen_logps, chosen_mask, hl)
    raw_r, l_r = _logratios(policy_rejected_logps, ref_rejected_logps, rejected_mask, hl)
    r_c = beta * l_c.sum(-1)
    r_r = beta * l_r.sum(-1)
    per_pair = -F.logsigmoid(r_c - r_r)
    loss = per_pair.sum() / _denominator(per_pair.shape[0], batch_denominator)

    masks = [chosen_mask, rejected_mask]
    metrics = {
        "rewards/chosen": _mean(r_c),
        "rewards/rejected": _mean(r_r),
        "rewards/margins": _mean(r_c - r_r),
        "rewards/accuracies": _mean((r_c > r_r).float()),
        "logps/chosen": _mean(_fill(policy_chosen_logps, chosen_mask).sum(-1)),
        "logps/rejected": _mean(_fill(policy_rejected_logps, rejected_mask).sum(-1)),
        "logratio/abs_mean": _abs_mean([raw_c, raw_r], masks),
    }
    if hl is not None:
        metrics["humanline/unclamped"] = _unclamped_metric([raw_c, raw_r], masks, hl)
    return LossOutput(loss, per_pair, metrics)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    desirable: Tensor,
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    kl_mask: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    humanline: tuple[float, float] | None = None,
    kl_reduce: Callable[[Tensor], Tensor] | None = None,
    batch_denominator: float | None = None,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024), optionally humanline.

    ``r = sum_t l_t`` per row (clipped under humanline). Reference point
    ``z0 = max(0, mean over KL rows of sum_t l_t)``, the KL rows being mismatched (prompt, other
    output) pairs; no gradient, clipped likewise under humanline. Desirable rows:
    ``w_D * (1 - sigmoid(beta * (r - z0)))``; undesirable: ``w_U * (1 - sigmoid(beta * (z0 - r)))``.
    Loss = sum over rows / ``batch_denominator`` (default: the number of rows B).
    ``per_example`` is the per-row loss [B].

    ``kl_reduce`` (several processes) receives the local ``[sum of KL-row rewards, number of KL
    rows]`` (1-d, 2 entries) and returns the global sums (e.g. an all-reduce); then
    ``z0 = max(0, sum / count)``. No KL rows at all gives ``z0 = 0`` rather than NaN.
    Metrics of a side (desirable/undesirable) with no rows are omitted.
    """
    hl = validate_humanline(humanline)
    raw, l = _logratios(policy_logps, ref_logps, mask, hl)
    r = l.sum(-1)

    with torch.no_grad():
        _, l_kl = _logratios(policy_kl_logps.detach(), ref_kl_logps.detach(), kl_mask, hl)
        r_kl = l_kl.sum(-1)
        # at least fp32 so that the row count stays exact through the all-reduce
        dt = torch.promote_types(r_kl.dtype, torch.float32)
        n_kl = torch.tensor(float(r_kl.shape[0]), dtype=dt, device=r_kl.device)
        stats = torch.stack([r_kl.sum().to(dt), n_kl])
        if kl_reduce is not None:
            stats = kl_reduce(stats)
        z0 = (stats[0] / stats[1].clamp(min=1)).clamp(min=0).to(r.dtype)

    desirable = desirable.to(device=r.device, dtype=torch.bool)
    # 1 - sigmoid(x) as sigmoid(-x): no cancellation for large x
    per_row = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(-beta * (r - z0)),
        undesirable_weight * torch.sigmoid(-beta * (z0 - r)),
    )
    loss = per_row.sum() / _denominator(per_row.shape[0], batch_denominator)

    n_d = int(desirable.sum())
    n_u = desirable.numel() - n_d
    seq_logps = _fill(policy_logps, mask).sum(-1)
    metrics: dict[str, Tensor] = {
        "kl": z0.detach().float(),
        "count/desirable": torch.tensor(float(n_d), device=r.device),
        "count/undesirable": torch.tensor(float(n_u), device=r.device),
        "logratio/abs_mean": _abs_mean([raw], [mask]),
    }
    # a side with no rows has no mean: omit its keys rather than log a made-up 0
    if n_d:
        metrics["rewards/chosen"] = _mean(beta * r[desirable])
        metrics["logps/chosen"] = _mean(seq_logps[desirable])
    if n_u:
        metrics["rewards/rejected"] = _mean(beta * r[~desirable])
        metrics["logps/rejected"] = _mean(seq_logps[~desirable])
    if n_d and n_u:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if hl is not None:
        metrics["humanline/unclamped"] = _unclamped_metric([raw], [mask], hl)
    return LossOutput(loss, per_row, metrics)


def grpo_loss(
    policy_logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    mask: Tensor,
    advantages: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    humanline: tuple[float, float] | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    token_denominator: float | None = None,
    sequence_denominator: float | None = None,
) -> LossOutput:
    """GRPO (Shao et al. 2024) with the PPO clip, optionally humanline.

    Ratio, normal: ``rho_t = exp(policy_t - old_t)``, ``old`` the behaviour policy (detached);
    ``old_logps=None`` means on-policy, ``old = policy.detach()`` (``rho = 1`` with gradient, as
    in TRL). Humanline: ``rho_t = exp(clip(policy_t - ref_t))`` with ``ref`` the synced reference,
    which replaces the behaviour policy as in the authors' code (``old_logps`` is then ignored).

    Per token: ``-min(A rho_t, A clamp(rho_t, 1 - epsilon_low, 1 + epsilon_high)) + beta k3_t``,
    ``k3_t = exp(ref_t - policy_t) - (ref_t - policy_t) - 1`` (unclipped; ``ref_logps`` may be
    None when beta == 0).

    Aggregation (``loss_type``):

    * ``"grpo"``: mean over each sequence's tokens, then sum / ``sequence_denominator`` (default B);
    * ``"dapo"``: sum over masked tokens / ``token_denominator`` (default: number of masked tokens);
    * ``"dr_grpo"``: sum over masked tokens / (``sequence_denominator`` (default B) *
      ``max_completion_length``).

    ``token_denominator`` is used by "dapo" only, ``sequence_denominator`` by "grpo" and "dr_grpo"
    only. ``per_example`` is each sequence's mean token loss [B], whatever the aggregation.
    """
    hl = validate_humanline(humanline)
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
    if beta != 0 and ref_logps is None:
        raise ValueError("grpo_loss with beta != 0 needs ref_logps for the KL term")

    if hl is not None:
        if ref_logps is None:
            raise ValueError("humanline grpo_loss needs ref_logps (the synced reference)")
        raw, log_rho = _logratios(policy_logps, ref_logps, mask, hl)
    else:
        old = policy_logps.detach() if old_logps is None else old_logps.detach()
        raw = log_rho = _fill(policy_logps, mask) - _fill(old, mask)
    rho = torch.exp(log_rho)

    adv = advantages.to(device=rho.device, dtype=rho.dtype).unsqueeze(-1)
    unclipped = adv * rho
    clipped = adv * torch.clamp(rho, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.minimum(unclipped, clipped)

    k3 = None
    if ref_logps is not None:
        d = _fill(ref_logps, mask) - _fill(policy_logps, mask)
        k3 = torch.exp(d) - d - 1
        if beta != 0:
            per_token = per_token + beta * k3
    per_token = _fill(per_token, mask)

    n_tokens = mask.sum(-1)
    per_seq = per_token.sum(-1) / n_tokens.clamp(min=1)
    n_seq = per_token.shape[0]
    if loss_type == "grpo":
        loss = per_seq.sum() / _denominator(n_seq, sequence_denominator)
    elif loss_type == "dapo":
        loss = per_token.sum() / _denominator(n_tokens.sum(), token_denominator)
    else:
        denom = _denominator(n_seq, sequence_denominator) * max_completion_length
        loss = per_token.sum() / denom

    with torch.no_grad():
        total = n_tokens.sum().clamp(min=1).float()
        # TRL semantics: the clip binds from below only if A < 0, from above only if A > 0
        low = mask & (rho < 1 - epsilon_low) & (adv < 0)
        high = mask & (rho > 1 + epsilon_high) & (adv > 0)
        metrics: dict[str, Tensor] = {
            "clip_ratio/low_mean": low.sum().float() / total,
            "clip_ratio/high_mean": high.sum().float() / total,
            "clip_ratio/region_mean": (low | high).sum().float() / total,
            "logratio/abs_mean": _abs_mean([raw], [mask]),
        }
        if k3 is not None:
            metrics["kl"] = _fill(k3, mask).sum().float() / total
        if hl is not None:
            metrics["humanline/unclamped"] = _unclamped_metric([raw], [mask], hl)
    return LossOutput(loss, per_seq, metrics)


def group_advantages(scores: Tensor, group_ids: Tensor, *, scale: bool = True,
                     eps: float = 1e-4) -> Tensor:
    """Group-relative advantages: ``(s - mean_g) / (std_g + eps)`` (population std), or ``s - mean_g``.

    ``group_ids`` are arbitrary integers (not necessarily contiguous or sorted). Vectorised with
    ``index_add``/``scatter_reduce``. A constant group gets exactly 0 (not a rounding residue).
    """
    if scores.dim() != 1 or scores.shape != group_ids.shape:
        raise ValueError(f"scores and group_ids must be 1-d of one shape, got "
                         f"{tuple(scores.shape)} and {tuple(group_ids.shape)}")
    s = scores if scores.is_floating_point() else scores.float()
    if s.numel() == 0:
        return s.clone()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n = int(inv.max()) + 1

    def zeros() -> Tensor:
        return torch.zeros(n, dtype=s.dtype, device=s.device)

    counts = zeros().index_add_(0, inv, torch.ones_like(s))
    mean = zeros().index_add_(0, inv, s) / counts
    gmax = zeros().scatter_reduce(0, inv, s, reduce="amax", include_self=False)
    gmin = zeros().scatter_reduce(0, inv, s, reduce="amin", include_self=False)
    # sum/count may round (e.g. three 0.1s); a constant group must still give exact zeros
    constant = (gmax == gmin)[inv]
    centred = torch.where(constant, torch.zeros_like(s), s - mean[inv])
    if not scale:
        return centred
    var = zeros().index_add_(0, inv, centred**2) / counts
    # where(): with eps = 0 a constant group would be 0 / 0
    return torch.where(constant, torch.zeros_like(s), centred / (var.sqrt()[inv] + eps))


def sft_loss(policy_logps: Tensor, mask: Tensor, *,
             token_denominator: float | None = None) -> LossOutput:
    """Negative log-likelihood per response token: ``-sum_masked log p / token_denominator``.

    ``token_denominator`` defaults to the number of masked tokens. ``per_example`` is each
    sequence's mean NLL; the ``nll`` metric is the local mean whatever the denominator.
    """
    nll = -_fill(policy_logps, mask)
    n_tokens = mask.sum(-1)
    loss = nll.sum() / _denominator(n_tokens.sum(), token_denominator)
    per_seq = nll.sum(-1) / n_tokens.clamp(min=1)
    local = nll.detach().sum().float() / n_tokens.sum().clamp(min=1)
    return LossOutput(loss, per_seq, {"nll": local})
