"""Prospect-theory primitives: value function, probability weighting, CPT decision weights.

The humanline paper (arXiv 2509.24207) argues that people judge a model's outputs through a
distorted probability weighting (over-weighting rare outcomes, under-weighting typical ones) and
that PPO/GRPO-style clipping recovers such a distortion. These helpers make the theory concrete
(analysis, plots, tests); no loss depends on them.

References:

* Kahneman & Tversky (1979), "Prospect theory: an analysis of decision under risk", Econometrica.
* Tversky & Kahneman (1992), "Advances in prospect theory: cumulative representation of
  uncertainty", J. Risk and Uncertainty: ``alpha = beta = 0.88``, ``lambda = 2.25``,
  ``gamma = 0.61`` (gains), ``delta = 0.69`` (losses).
* Prelec (1998), "The probability weighting function", Econometrica.

Scalar functions accept a Python float (returning a float) or a torch tensor (elementwise).
Distribution functions accept sequences or 1-d tensors and return float64 tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

__all__ = [
    "cpt_decision_weights",
    "kt_value",
    "perceived_distribution",
    "prelec_weight",
    "prospect_value",
    "tk_weight",
]

Num = TypeVar("Num", float, Tensor)
Weighting = Callable[..., Tensor]


def kt_value(z: Num, *, alpha: float = 0.88, beta: float = 0.88, lam: float = 2.25,
             reference: float = 0.0) -> Num:
    """Kahneman-Tversky value function of the outcome ``z`` relative to ``reference``.

    With ``x = z - reference``: ``v(x) = x^alpha`` for ``x >= 0`` and ``v(x) = -lam (-x)^beta``
    for ``x < 0`` (concave for gains, convex for losses, steeper for losses: loss aversion). With
    ``alpha == beta``, ``v(-x) = -lam v(x)``.
    """
    if isinstance(z, Tensor):
        x = z - reference
        # clamp each branch's base to >= 0: a fractional power of a negative base is NaN
        gains = x.clamp(min=0) ** alpha
        losses = -lam * (-x).clamp(min=0) ** beta
        return torch.where(x >= 0, gains, losses)
    x = float(z) - reference
    return x**alpha if x >= 0 else -lam * (-x) ** beta


def tk_weight(p: Num, gamma: float = 0.61) -> Num:
    """Tversky-Kahneman (1992) probability weighting ``w(p) = p^g / (p^g + (1-p)^g)^(1/g)``.

    ``w(0) = 0``, ``w(1) = 1``; for ``0 < g < 1`` it over-weights small probabilities and
    under-weights moderate and large ones (at g = 0.61: ``w(0.01) = 0.0553``,
    ``w(0.5) = 0.4206``; the fixed point is near p = 0.34).
    """
    if isinstance(p, Tensor):
        p = p.clamp(0, 1)  # 1 - p must not be negative under a fractional power
    elif not 0.0 <= p <= 1.0:
        raise ValueError(f"a probability must lie in [0, 1], got {p}")
    num = p**gamma
    return num / (num + (1 - p) ** gamma) ** (1 / gamma)


def prelec_weight(p: Num, alpha: float = 0.65, beta: float = 1.0) -> Num:
    """Prelec (1998) probability weighting ``w(p) = exp(-beta (-ln p)^alpha)``.

    ``w(0) = 0`` (limit), ``w(1) = 1``; with ``beta = 1`` the fixed point is ``p = 1/e`` for any
    ``alpha``, and ``0 < alpha < 1`` gives the inverse-S shape.
    """
    if isinstance(p, Tensor):
        # -log(0) = inf gives exp(-inf) = 0; clamp(min=0) turns -log(1) = -0.0 into +0.0
        return torch.exp(-beta * (-torch.log(p.clamp(0, 1))).clamp(min=0) ** alpha)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a probability must lie in [0, 1], got {p}")
    if p == 0.0:
        return 0.0
    return math.exp(-beta * max(0.0, -math.log(p)) ** alpha)


def _distribution(outcomes: Sequence[float] | Tensor,
                  probs: Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(outcomes, dtype=torch.float64)
    p = torch.as_tensor(probs, dtype=torch.float64)
    if x.dim() != 1 or x.shape != p.shape or x.numel() == 0:
        raise ValueError(f"outcomes and probs must be non-empty 1-d of one length, got "
                         f"{tuple(x.shape)} and {tuple(p.shape)}")
    if bool((p < 0).any()) or not math.isclose(float(p.sum()), 1.0, abs_tol=1e-6):
        raise ValueError("probs must be non-negative and sum to 1")
    return x, p / p.sum()


def cpt_decision_weights(
    outcomes: Sequence[float] | Tensor,
    probs: Sequence[float] | Tensor,
    *,
    gamma_gain: float = 0.61,
    gamma_loss: float = 0.69,
    reference: float = 0.0,
    weighting: Weighting = tk_weight,
) -> Tensor:
    """Decision weights ``pi_i`` of a discrete prospect under cumulative prospect theory (TK 1992).

    Rank-dependent: outcomes at or above ``reference`` are gains, with
    ``pi_i = w+(P(X >= x_i)) - w+(P(X > x_i))``; outcomes below are losses, with the mirrored
    ``pi_i = w-(P(X <= x_i)) - w-(P(X < x_i))``. ``weighting(p, gamma)`` is called with
    ``gamma_gain`` or ``gamma_loss`` (``prelec_weight`` takes them as its alpha). Tied outcomes
    share their joint weight in proportion to their probabilities (order-independent).

    The gain weights sum to ``w+(P(X >= reference))`` and the loss weights to
    ``w-(P(X < reference))``, by telescoping; so with only gains (or only losses) they sum to
    ``w(1) = 1``, but a mixed prospect's weights need not sum to 1.
    """
    x, p = _distribution(outcomes, probs)
    x = x - reference
    above = x[None, :] > x[:, None]  # [i, j]: x_j > x_i
    equal = x[None, :] == x[:, None]
    prob = p[None, :]

    def mass(rel: Tensor) -> Tensor:
        # float sums may stray just past 1; fractional powers of (1 - p) need p <= 1
        return (prob * rel).sum(1).clamp(0, 1)

    p_eq = (prob * equal).sum(1)
    p_ge, p_gt = mass(above | equal), mass(above)
    p_le, p_lt = mass(~above), mass(~above & ~equal)
    gains = weighting(p_ge, gamma_gain) - weighting(p_gt, gamma_gain)
    losses = weighting(p_le, gamma_loss) - weighting(p_lt, gamma_loss)
    joint = torch.where(x >= 0, gains, losses)
    share = torch.where(p_eq > 0, p / p_eq.clamp(min=1e-300), torch.zeros_like(p))
    return joint * share


def perceived_distribution(
    outcomes: Sequence[float] | Tensor,
    probs: Sequence[float] | Tensor,
    *,
    gamma_gain: float = 0.61,
    gamma_loss: float = 0.69,
    reference: float = 0.0,
    weighting: Weighting = tk_weight,
) -> Tensor:
    """The "human-perceived distribution": CPT decision weights normalised to sum to 1."""
    pi = cpt_decision_weights(outcomes, probs, gamma_gain=gamma_gain, gamma_loss=gamma_loss,
                              reference=reference, weighting=weighting)
    return pi / pi.sum()


def prospect_value(
    outcomes: Sequence[float] | Tensor,
    probs: Sequence[float] | Tensor,
    *,
    alpha: float = 0.88,
    beta: float = 0.88,
    lam: float = 2.25,
    gamma_gain: float = 0.61,
    gamma_loss: float = 0.69,
    reference: float = 0.0,
    weighting: Weighting = tk_weight,
) -> float:
    """CPT value of a prospect: ``sum_i pi_i v(x_i - reference)`` (TK 1992)."""
    pi = cpt_decision_weights(outcomes, probs, gamma_gain=gamma_gain, gamma_loss=gamma_loss,
                              reference=reference, weighting=weighting)
    x = torch.as_tensor(outcomes, dtype=torch.float64)
    v = kt_value(x, alpha=alpha, beta=beta, lam=lam, reference=reference)
    return float((pi * v).sum())
