"""What each objective needs from a collated batch, and which loss it calls.

One function per objective maps (batch, policy log-probs, reference log-probs) to a :class:`LossOutput`.
The trainer is the same for all of them. ``denominators`` are global counts over every micro-batch and
process of the optimizer step, so that summing the micro-batch losses gives exactly the full-batch loss
whatever the split (gradient accumulation and data parallelism included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .losses import LossOutput, dpo_loss, grpo_loss, humanline_reject_mask, kto_loss, sft_loss


@dataclass
class LossSettings:
    objective: str
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    kl_beta: float = 0.0
    loss_type: str = "dapo"
    max_completion_length: int | None = None
    humanline: tuple[float, float] | None = None  # clamp bounds, or None
    reject_gamma: float | None = None  # "reject" humanline mode instead of the clamp
    seed: int = 0

    @property
    def needs_reference(self) -> bool:
        return self.objective in ("dpo", "kto") or (self.objective == "grpo" and (
            self.kl_beta > 0 or self.humanline is not None or self.reject_gamma is not None))


def global_counts(batch_rows: list[dict[str, Tensor]], objective: str) -> dict[str, float]:
    """Local sums that the trainer all-reduces into the step's denominators."""
    examples = sum(int(b["labels"].shape[0]) // (2 if objective in ("dpo", "kto") else 1) for b in batch_rows)
    tokens = sum(int(b["num_response_tokens"]) for b in batch_rows)
    return {"examples": float(examples), "tokens": float(tokens)}


def _reject(mask: Tensor, logratio: Tensor, s: LossSettings, step_seed: int) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(step_seed)
    return humanline_reject_mask(logratio.detach().cpu(), mask.cpu(), gamma=s.reject_gamma,
                                 generator=gen).to(mask.device)


def compute_loss(s: LossSettings, batch: dict[str, Tensor], logps: Tensor, ref_logps: Tensor | None,
                 mask: Tensor, denominators: dict[str, float], *, kl_sums: Tensor | None = None,
                 kto_kl: tuple[Tensor, Tensor, Tensor] | None = None, step_seed: int = 0) -> LossOutput:
    """The objective's loss on one micro-batch, normalised by the step's global ``denominators``.

    For KTO, ``logps``/``ref_logps``/``mask`` hold the examples' rows and ``kto_kl`` the (policy, reference,
    mask) of their KL rows; ``kl_sums`` (global [sum, count] of the KL rows) replaces the local z0 estimate.
    """
    if s.reject_gamma is not None and ref_logps is not None:
        mask = _reject(mask, logps - ref_logps, s, step_seed)
    if s.objective == "sft":
        return sft_loss(logps, mask, token_denominator=denominators["tokens"])
    if s.objective == "dpo":
        b = logps.shape[0] // 2
        assert ref_logps is not None
        return dpo_loss(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], mask[:b], mask[b:], beta=s.beta,
                        humanline=s.humanline, batch_denominator=denominators["examples"])
    if s.objective == "kto":
        assert ref_logps is not None and kto_kl is not None
        reduce: Callable[[Tensor], Tensor] | None = (lambda _local: kl_sums) if kl_sums is not None else None
        pol_kl, ref_kl, kl_mask = kto_kl
        return kto_loss(logps, ref_logps, mask, batch["label"], pol_kl.detach(), ref_kl, kl_mask, beta=s.beta,
                        desirable_weight=s.desirable_weight, undesirable_weight=s.undesirable_weight,
                        humanline=s.humanline, kl_reduce=reduce, batch_denominator=denominators["examples"])
    if s.objective == "grpo":
        old = _behaviour_logps(batch, logps, ref_logps)
        return grpo_loss(logps, old, ref_logps, mask, batch["advantages"], epsilon_low=s.epsilon_low,
                         epsilon_high=s.epsilon_high, beta=s.kl_beta, humanline=s.humanline,
                         loss_type=s.loss_type, max_completion_length=s.max_completion_length,
                         token_denominator=denominators["tokens"], sequence_denominator=denominators["examples"])
    raise ValueError(f"unknown objective {s.objective!r}")


def _behaviour_logps(batch: dict[str, Tensor], logps: Tensor, ref_logps: Tensor | None) -> Tensor:
    """The sampling policy's log-probs for normal GRPO's ratio.

    Stored ones (from our rollouts, or an ``old_logps`` column) where a row has them; otherwise the frozen
    initial model's (offline data is usually sampled from it), or, with no reference, the current policy
    (ratio 1: plain policy gradient, as in one-update-per-generation GRPO).
    """
    fallback = ref_logps if ref_logps is not None else logps.detach()
    if "old_logps" not in batch:
        return fallback
    has = batch["has_old_logps"].to(torch.bool).unsqueeze(1)
    return torch.where(has, batch["old_logps"].to(logps.dtype), fallback)


def kl_row_sums(s: LossSettings, kl_logps: Tensor, kl_ref_logps: Tensor, kl_mask: Tensor) -> Tensor:
    """KTO: local [sum of the KL rows' (clipped) sequence log-ratios, number of KL rows] for z0."""
    ratio = kl_logps - kl_ref_logps
    if s.humanline is not None:
        ratio = ratio.clamp(*s.humanline)
    ratio = torch.where(kl_mask, ratio, torch.zeros_like(ratio))
    return torch.stack([ratio.sum().double(), torch.tensor(float(kl_logps.shape[0]), dtype=torch.float64,
                                                            device=ratio.device)])
