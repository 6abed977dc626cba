"""Tests of humanline.losses: hand-computed cases, humanline limits, masking, denominators."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from humanline.losses import (
    dpo_loss,
    group_advantages,
    grpo_loss,
    humanline_clip,
    humanline_reject_mask,
    kto_loss,
    sft_loss,
    unclamped_fraction,
    validate_humanline,
)

D = torch.float64
INF = math.inf
GARBAGE = [math.nan, math.inf, -math.inf, 1e30, -1e30]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(rows: list[list[float]], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] float64 tensor (padding = garbage) and its bool mask."""
    width = pad_to or max(len(r) for r in rows)
    x = torch.empty(len(rows), width, dtype=D)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    k = 0
    for i, r in enumerate(rows):
        for j in range(width):
            if j < len(r):
                x[i, j] = r[j]
                mask[i, j] = True
            else:
                x[i, j] = GARBAGE[k % len(GARBAGE)]
                k += 1
    return x, mask


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)


def val(x: torch.Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


# ------------------------------------------------------------------------------------- humanline


def test_validate_humanline():
    assert validate_humanline(None) is None
    assert validate_humanline((-1, 1.5)) == (-1.0, 1.5)
    assert validate_humanline([-INF, INF]) == (-INF, INF)
    for bad in [(1.0, -1.0), (0.5, 0.5), (math.nan, 1.0), (1.0,), (1, 2, 3), "ab", 3.0]:
        with pytest.raises(ValueError):
            validate_humanline(bad)  # type: ignore[arg-type]
    p, m = t([[0.0]])
    with pytest.raises(ValueError):
        dpo_loss(p, p, p, p, m, m, humanline=(1.0, -1.0))
    with pytest.raises(ValueError):
        kto_loss(p, p, m, torch.tensor([True]), p, p, m, humanline=(0.0, 0.0))
    with pytest.raises(ValueError):
        grpo_loss(p, p, p, m, torch.ones(1), humanline=(2.0, 1.0))


def test_humanline_clip_values_and_gradient():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 1.0, 1.5, 2.0], dtype=D, requires_grad=True)
    y = humanline_clip(x, -1.0, 1.5)
    assert y.tolist() == [-1.0, -1.0, -0.5, 0.0, 1.0, 1.5, 1.5]
    y.sum().backward()
    g = x.grad.tolist()
    # zero strictly outside, one strictly inside
    assert g[0] == 0.0 and g[-1] == 0.0
    assert g[2] == g[3] == g[4] == 1.0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-50, 50), min_size=1, max_size=20),
    st.floats(-5, 0), st.floats(0.01, 5),
)
def test_clip_property(values, lo, width):
    hi = lo + width
    x = torch.tensor(values, dtype=D)
    y = humanline_clip(x, lo, hi)
    assert bool(((y >= lo) & (y <= hi)).all())
    inside = (x >= lo) & (x <= hi)
    assert torch.equal(y[inside], x[inside])


def test_unclamped_fraction():
    x, m = t([[0.0, 0.5, 2.0], [-1.0, -3.0]])
    assert val(unclamped_fraction(x, m, -1.0, 1.5)) == pytest.approx(2 / 5)  # -1.0 on the bound
    # step 0 of syncing: every l_t = 0, strictly inside a band around 0
    z = torch.zeros(2, 3, dtype=D)
    assert val(unclamped_fraction(z, m, -1.0, 1.5)) == 1.0
    assert val(unclamped_fraction(z, torch.zeros_like(m), -1.0, 1.5)) == 0.0


# ------------------------------------------------------------------------------------------ DPO


def dpo_case():
    pc, cm = t([[-1.0, -2.0]], pad_to=3)
    rc, _ = t([[-1.5, -1.0]], pad_to=3)
    pr, rm = t([[-2.0, -3.0]], pad_to=3)
    rr, _ = t([[-1.0, -1.0]], pad_to=3)
    return pc, pr, rc, rr, cm, rm


def test_dpo_hand_normal():
    pc, pr, rc, rr, cm, rm = dpo_case()
    pc, pr = leaf(pc), leaf(pr)
    out = dpo_loss(pc, pr, rc, rr, cm, rm, beta=0.5)
    # l_chosen = [0.5, -1] -> r = 0.5 * -0.5; l_rejected = [-1, -2] -> r = 0.5 * -3
    r_c, r_r = -0.25, -1.5
    assert val(out.loss) == pytest.approx(math.log1p(math.exp(-(r_c - r_r))), abs=1e-12)
    m = out.metrics
    assert val(m["rewards/chosen"]) == pytest.approx(r_c)
    assert val(m["rewards/rejected"]) == pytest.approx(r_r)
    assert val(m["rewards/margins"]) == pytest.approx(1.25)
    assert val(m["rewards/accuracies"]) == 1.0
    assert val(m["logps/chosen"]) == pytest.approx(-3.0)
    assert val(m["logps/rejected"]) == pytest.approx(-5.0)
    assert val(m["logratio/abs_mean"]) == pytest.approx((0.5 + 1 + 1 + 2) / 4)
    assert "humanline/unclamped" not in m
    out.loss.backward()
    g = -0.5 * sig(-1.25)  # d loss / d policy_chosen token = beta * d(-logsigmoid(m))/dm
    assert pc.grad[0].tolist() == pytest.approx([g, g, 0.0])
    assert pr.grad[0].tolist() == pytest.approx([-g, -g, 0.0])


def test_dpo_hand_humanline():
    pc, pr, rc, rr, cm, rm = dpo_case()
    pc, pr = leaf(pc), leaf(pr)
    out = dpo_loss(pc, pr, rc, rr, cm, rm, beta=0.5, humanline=(-1.5, 0.25))
    # chosen [0.5, -1] -> [0.25, -1]; rejected [-1, -2] -> [-1, -1.5]
    r_c, r_r = 0.5 * -0.75, 0.5 * -2.5
    assert val(out.loss) == pytest.approx(-math.log(sig(r_c - r_r)), abs=1e-12)
    assert val(out.metrics["humanline/unclamped"]) == pytest.approx(0.5)
    assert val(out.metrics["logratio/abs_mean"]) == pytest.approx(4.5 / 4)  # unclipped
    out.loss.backward()
    g = -0.5 * sig(-(r_c - r_r))
    # clamped tokens (0.5 > 0.25 and -2 < -1.5) get exactly zero gradient
    assert pc.grad[0].tolist() == pytest.approx([0.0, g, 0.0])
    assert pc.grad[0, 0].item() == 0.0 and pr.grad[0, 1].item() == 0.0
    assert pr.grad[0].tolist() == pytest.approx([-g, 0.0, 0.0])


@pytest.mark.parametrize("band", [(-INF, INF), (-1e9, 1e9)])
def test_dpo_wide_band_equals_normal(band):
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(3, 4, dtype=D) for _ in range(4))
    cm = torch.rand(3, 4) < 0.7
    rm = torch.rand(3, 4) < 0.7
    a = dpo_loss(pc, pr, rc, rr, cm, rm)
    b = dpo_loss(pc, pr, rc, rr, cm, rm, humanline=band)
    assert val(a.loss) == pytest.approx(val(b.loss), abs=1e-12)
    assert val(b.metrics["humanline/unclamped"]) == 1.0


def test_dpo_batch_denominator_split():
    torch.manual_seed(1)
    pc, pr, rc, rr = (torch.randn(4, 3, dtype=D) for _ in range(4))
    cm = torch.rand(4, 3) < 0.8
    rm = torch.rand(4, 3) < 0.8
    full = dpo_loss(pc, pr, rc, rr, cm, rm, humanline=(-0.5, 0.5)).loss
    parts = sum(
        dpo_loss(pc[s], pr[s], rc[s], rr[s], cm[s], rm[s], humanline=(-0.5, 0.5),
                 batch_denominator=4).loss
        for s in (slice(0, 1), slice(1, 4))
    )
    assert val(parts) == pytest.approx(val(full), abs=1e-12)


# ------------------------------------------------------------------------------------------ KTO


def kto_case():
    p, m = t([[-1.0, -2.0], [-2.0, -3.0, -0.5]])
    r, _ = t([[-1.5, -1.0], [-1.0, -1.0, -0.5]])
    pk, km = t([[-1.0, -1.0], [-3.0, -1.0]], pad_to=4)
    rk, _ = t([[-2.0, -1.5], [-2.0, -2.0]], pad_to=4)
    return p, r, m, torch.tensor([True, False]), pk, rk, km


def test_kto_hand_normal():
    p, r, m, des, pk, rk, km = kto_case()
    p = leaf(p)
    pk = leaf(pk)
    out = kto_loss(p, r, m, des, pk, rk, km, beta=0.5, desirable_weight=1.1, undesirable_weight=0.9)
    # r = [-0.5, -3]; KL rows: 1.5 and 0 -> z0 = 0.75
    z0 = 0.75
    d = 1.1 * (1 - sig(0.5 * (-0.5 - z0)))
    u = 0.9 * (1 - sig(0.5 * (z0 + 3)))
    assert val(out.loss) == pytest.approx((d + u) / 2, abs=1e-12)
    assert out.per_example.tolist() == pytest.approx([d, u])
    mt = out.metrics
    assert val(mt["kl"]) == pytest.approx(z0)
    assert val(mt["rewards/chosen"]) == pytest.approx(-0.25)
    assert val(mt["rewards/rejected"]) == pytest.approx(-1.5)
    assert val(mt["rewards/margins"]) == pytest.approx(1.25)
    assert val(mt["logps/chosen"]) == pytest.approx(-3.0)
    assert val(mt["logps/rejected"]) == pytest.approx(-5.5)
    assert val(mt["count/desirable"]) == 1 and val(mt["count/undesirable"]) == 1
    assert val(mt["logratio/abs_mean"]) == pytest.approx(4.5 / 5)
    out.loss.backward()
    # d/dr of w_D (1 - sigmoid(beta (r - z0))) = -w_D beta s (1 - s)
    s_d = sig(0.5 * (-0.5 - z0))
    s_u = sig(0.5 * (z0 + 3))
    gd = -1.1 * 0.5 * s_d * (1 - s_d) / 2
    gu = 0.9 * 0.5 * s_u * (1 - s_u) / 2
    assert torch.allclose(p.grad, torch.tensor([[gd, gd, 0.0], [gu, gu, gu]], dtype=D))
    assert pk.grad is None or bool((pk.grad == 0).all())  # z0 carries no gradient


def test_kto_hand_humanline_and_negative_kl():
    p, r, m, des, pk, rk, km = kto_case()
    p = leaf(p)
    out = kto_loss(p, r, m, des, pk, rk, km, beta=0.5, humanline=(-0.5, 1.0))
    # rows [0.5, -1] -> 0; [-1, -2, 0] -> [-0.5, -0.5, 0] = -1; KL [1, .5] -> 1.5, [-1, 1] -> .5
    z0 = 1.0
    d = 1 - sig(0.5 * (0 - z0))
    u = 1 - sig(0.5 * (z0 + 1))
    assert val(out.loss) == pytest.approx((d + u) / 2, abs=1e-12)
    assert val(out.metrics["kl"]) == pytest.approx(z0)
    assert val(out.metrics["humanline/unclamped"]) == pytest.approx(2 / 5)  # 0.5 and 0
    out.loss.backward()
    assert p.grad[0, 1].item() == 0.0 and p.grad[1, 0].item() == 0.0 and p.grad[1, 1].item() == 0.0
    assert p.grad[0, 0].item() != 0.0 and p.grad[1, 2].item() != 0.0
    # negative mismatched reward: z0 = max(0, .) = 0
    out = kto_loss(p, r, m, des, rk, pk, km, beta=0.5)
    assert val(out.metrics["kl"]) == 0.0


def test_kto_all_desirable_all_undesirable():
    p, r, m, _, pk, rk, km = kto_case()
    z0 = 0.75
    out = kto_loss(p, r, m, torch.tensor([True, True]), pk, rk, km, beta=0.5)
    exp = [1 - sig(0.5 * (-0.5 - z0)), 1 - sig(0.5 * (-3 - z0))]
    assert val(out.loss) == pytest.approx(sum(exp) / 2)
    assert "rewards/rejected" not in out.metrics and "rewards/margins" not in out.metrics
    assert "logps/rejected" not in out.metrics
    assert val(out.metrics["count/undesirable"]) == 0
    out = kto_loss(p, r, m, torch.tensor([False, False]), pk, rk, km, beta=0.5)
    exp = [1 - sig(0.5 * (z0 + 0.5)), 1 - sig(0.5 * (z0 + 3))]
    assert val(out.loss) == pytest.approx(sum(exp) / 2)
    assert "rewards/chosen" not in out.metrics and "rewards/margins" not in out.metrics
    for v in out.metrics.values():
        assert math.isfinite(val(v))


def test_kto_kl_reduce_hook():
    p, r, m, des, pk, rk, km = kto_case()
    base = kto_loss(p, r, m, des, pk, rk, km, beta=0.5)
    seen = []

    def doubled(stats):
        seen.append(stats.clone())
        return stats * 2

    same = kto_loss(p, r, m, des, pk, rk, km, beta=0.5, kl_reduce=doubled)
    assert seen[0].tolist() == pytest.approx([1.5, 2.0])  # [sum of KL-row rewards, count]
    assert val(same.metrics["kl"]) == pytest.approx(0.75)
    assert val(same.loss) == pytest.approx(val(base.loss))
    # another process contributes 3 rows summing to 7.5: z0 = (1.5 + 7.5) / 5
    other = kto_loss(p, r, m, des, pk, rk, km, beta=0.5,
                     kl_reduce=lambda s: s + torch.tensor([7.5, 3.0], dtype=s.dtype))
    assert val(other.metrics["kl"]) == pytest.approx(9.0 / 5)
    assert val(other.loss) != pytest.approx(val(base.loss))
    # no KL rows anywhere: z0 = 0, not NaN
    empty = torch.zeros(0, 2, dtype=D)
    out = kto_loss(p, r, m, des, empty, empty, torch.zeros(0, 2, dtype=torch.bool))
    assert val(out.metrics["kl"]) == 0.0 and math.isfinite(val(out.loss))


@pytest.mark.parametrize("band", [(-INF, INF), (-1e9, 1e9)])
def test_kto_wide_band_equals_normal(band):
    p, r, m, des, pk, rk, km = kto_case()
    a = kto_loss(p, r, m, des, pk, rk, km)
    b = kto_loss(p, r, m, des, pk, rk, km, humanline=band)
    assert val(a.loss) == pytest.approx(val(b.loss), abs=1e-12)


def test_kto_batch_denominator_split():
    torch.manual_seed(2)
    p, r, pk, rk = (torch.randn(4, 3, dtype=D) for _ in range(4))
    m = torch.rand(4, 3) < 0.8
    km = torch.rand(4, 3) < 0.8
    des = torch.tensor([True, False, True, True])
    full = kto_loss(p, r, m, des, pk, rk, km, beta=0.3, humanline=(-0.5, 1.0))
    total = torch.zeros((), dtype=D)
    halves = (slice(0, 2), slice(2, 4))
    for s in halves:
        other = [h for h in halves if h != s][0]

        def reduce(stats, other=other):
            # stands in for an all-reduce: add the other half's (clipped) KL statistics
            l_o = torch.clamp(torch.where(km[other], pk[other] - rk[other], 0), -0.5, 1.0)
            l_o = torch.where(km[other], l_o, 0)
            return stats + torch.stack([l_o.sum(), torch.tensor(2.0, dtype=D)])

        total = total + kto_loss(p[s], r[s], m[s], des[s], pk[s], rk[s], km[s], beta=0.3,
                                 humanline=(-0.5, 1.0), kl_reduce=reduce, batch_denominator=4).loss
    assert val(total) == pytest.approx(val(full.loss), abs=1e-12)


# ----------------------------------------------------------------------------------------- GRPO


def grpo_case():
    # token ratios: row 0 (A = 1): [1.5, 0.5]; row 1 (A = -2): [1.1, 0.7, 1.5]
    lr, m = t([[math.log(1.5), math.log(0.5)], [math.log(1.1), math.log(0.7), math.log(1.5)]])
    old, _ = t([[-1.0, -2.0], [-0.5, -1.0, -3.0]], pad_to=3)
    policy = torch.where(m, old + torch.where(m, lr, 0), lr)  # garbage stays at padding
    return policy, old, m, torch.tensor([1.0, -2.0], dtype=D)


# per-token losses: row 0: -min(1.5, 1.2) = -1.2, -min(0.5, 0.8) = -0.5
#                   row 1: -min(-2.2, -2.2) = 2.2, -min(-1.4, -1.6) = 1.6, -min(-3, -2.4) = 3
GRPO_TOKENS = [[-1.2, -0.5], [2.2, 1.6, 3.0]]


@pytest.mark.parametrize("loss_type,expected", [
    ("grpo", ((-1.7 / 2) + (6.8 / 3)) / 2),
    ("dapo", 5.1 / 5),
    ("dr_grpo", 5.1 / (2 * 4)),
])
def test_grpo_hand_aggregations(loss_type, expected):
    policy, old, m, adv = grpo_case()
    policy = leaf(policy)
    out = grpo_loss(policy, old, None, m, adv, loss_type=loss_type, max_completion_length=4)
    assert val(out.loss) == pytest.approx(expected, abs=1e-12)
    assert out.per_example.tolist() == pytest.approx([-1.7 / 2, 6.8 / 3])
    out.loss.backward()
    # d(-A rho)/d logp = -A rho where unclipped; 0 where the clip binds
    raw = torch.tensor([[0.0, -0.5, 0.0], [2.2, 0.0, 3.0]], dtype=D)
    scale = {"grpo": torch.tensor([[1 / 4], [1 / 6]], dtype=D), "dapo": 1 / 5, "dr_grpo": 1 / 8}
    assert torch.allclose(policy.grad, raw * scale[loss_type])
    assert policy.grad[0, 0].item() == 0.0 and policy.grad[1, 1].item() == 0.0


def test_grpo_clip_ratios():
    policy, old, m, adv = grpo_case()
    mt = grpo_loss(policy, old, None, m, adv).metrics
    assert val(mt["clip_ratio/low_mean"]) == pytest.approx(1 / 5)  # 0.7 with A < 0
    assert val(mt["clip_ratio/high_mean"]) == pytest.approx(1 / 5)  # 1.5 with A > 0
    assert val(mt["clip_ratio/region_mean"]) == pytest.approx(2 / 5)
    assert "kl" not in mt and "humanline/unclamped" not in mt
    assert val(mt["logratio/abs_mean"]) == pytest.approx(
        sum(abs(math.log(x)) for x in [1.5, 0.5, 1.1, 0.7, 1.5]) / 5)


def test_grpo_asymmetric_epsilon():
    policy, old, m, adv = grpo_case()
    out = grpo_loss(policy, old, None, m, adv, epsilon_low=0.4, epsilon_high=0.6)
    # nothing binds now: per-token -A rho
    exp = (-1.5 - 0.5 + 2.2 + 1.4 + 3.0) / 5
    assert val(out.loss) == pytest.approx(exp)
    assert val(out.metrics["clip_ratio/region_mean"]) == 0.0


def test_grpo_kl_term():
    p, m = t([[-1.0, -2.0]], pad_to=3)
    ref, _ = t([[-1.5, -2.0]], pad_to=3)
    p = leaf(p)
    out = grpo_loss(p, p.detach(), ref, m, torch.zeros(1, dtype=D), beta=0.1)
    k3 = math.exp(-0.5) + 0.5 - 1  # d = ref - policy = -0.5 on token 0, 0 on token 1
    assert val(out.loss) == pytest.approx(0.1 * k3 / 2)
    assert val(out.metrics["kl"]) == pytest.approx(k3 / 2)
    out.loss.backward()
    # d k3 / d policy = -exp(d) + 1
    assert p.grad[0].tolist() == pytest.approx([0.1 * (1 - math.exp(-0.5)) / 2, 0.0, 0.0])
    with pytest.raises(ValueError):
        grpo_loss(p, p.detach(), None, m, torch.zeros(1, dtype=D), beta=0.1)


def test_grpo_humanline_hand():
    p, m = t([[0.5, 0.05, -0.3]], pad_to=4)
    ref = torch.zeros(1, 4, dtype=D)
    p = leaf(p)
    out = grpo_loss(p, None, ref, m, torch.ones(1, dtype=D), humanline=(-0.1, 0.1),
                    epsilon_low=0.2, epsilon_high=0.2)
    # clipped log-ratios [0.1, 0.05, -0.1]; all ratios inside the PPO clip
    assert val(out.loss) == pytest.approx(-(math.exp(0.1) + math.exp(0.05) + math.exp(-0.1)) / 3)
    assert val(out.metrics["humanline/unclamped"]) == pytest.approx(1 / 3)
    out.loss.backward()
    assert p.grad[0].tolist() == pytest.approx([0.0, -math.exp(0.05) / 3, 0.0, 0.0])
    assert p.grad[0, 0].item() == 0.0 and p.grad[0, 2].item() == 0.0
    with pytest.raises(ValueError):
        grpo_loss(p, p.detach(), None, m, torch.ones(1, dtype=D), humanline=(-0.1, 0.1))


@pytest.mark.parametrize("band", [(-INF, INF), (-1e9, 1e9)])
def test_grpo_humanline_with_ref_equal_old_is_normal(band):
    policy, old, m, adv = grpo_case()
    a, b = leaf(policy), leaf(policy)
    normal = grpo_loss(a, old, None, m, adv)
    hl = grpo_loss(b, None, old, m, adv, humanline=band)
    assert val(hl.loss) == pytest.approx(val(normal.loss), abs=1e-12)
    normal.loss.backward()
    hl.loss.backward()
    assert torch.allclose(a.grad, b.grad)


def test_grpo_on_policy_default():
    p, m = t([[-1.0, -2.0], [-0.5]])
    p = leaf(p)
    adv = torch.tensor([1.0, -1.0], dtype=D)
    out = grpo_loss(p, None, None, m, adv)  # rho = 1: loss = mean(-A)
    assert val(out.loss) == pytest.approx((-1 - 1 + 1) / 3)
    out.loss.backward()
    assert p.grad.tolist()[0][:2] == pytest.approx([-1 / 3, -1 / 3])


def test_grpo_bad_arguments():
    policy, old, m, adv = grpo_case()
    with pytest.raises(ValueError):
        grpo_loss(policy, old, None, m, adv, loss_type="bnpo")
    with pytest.raises(ValueError):
        grpo_loss(policy, old, None, m, adv, loss_type="dr_grpo")
    with pytest.raises(ValueError):
        grpo_loss(policy, old, None, m, adv, token_denominator=0.0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_denominators_split(loss_type):
    torch.manual_seed(3)
    p, old, ref = (torch.randn(5, 4, dtype=D) * 0.3 for _ in range(3))
    m = torch.rand(5, 4) < 0.7
    m[:, 0] = True
    adv = torch.randn(5, dtype=D)
    kw = dict(loss_type=loss_type, max_completion_length=4, beta=0.05, humanline=(-0.2, 0.3))
    full = grpo_loss(p, old, ref, m, adv, **kw).loss
    n_tok = float(m.sum())
    total = sum(
        grpo_loss(p[s], old[s], ref[s], m[s], adv[s], token_denominator=n_tok,
                  sequence_denominator=5, **kw).loss
        for s in (slice(0, 2), slice(2, 5))
    )
    assert val(total) == pytest.approx(val(full), abs=1e-12)


# ------------------------------------------------------------------------------------------ SFT


def test_sft_hand_and_split():
    p, m = t([[-1.0, -2.0], [-0.5, -0.5, -2.0]])
    p = leaf(p)
    out = sft_loss(p, m)
    assert val(out.loss) == pytest.approx(6.0 / 5)
    assert val(out.metrics["nll"]) == pytest.approx(6.0 / 5)
    assert out.per_example.tolist() == pytest.approx([1.5, 1.0])
    out.loss.backward()
    assert torch.allclose(p.grad, torch.tensor([[-0.2, -0.2, 0.0], [-0.2, -0.2, -0.2]], dtype=D))
    parts = sft_loss(p[:1], m[:1], token_denominator=5).loss + sft_loss(p[1:], m[1:],
                                                                          token_denominator=5).loss
    assert val(parts) == pytest.approx(6.0 / 5)


# ------------------------------------------------------------------- padding garbage changes nothing


def _all_losses(fill: float | None, humanline):
    """Every loss on one random batch whose padding holds ``fill`` (None: trimmed, no padding)."""
    g = torch.Generator().manual_seed(4)
    b, t_valid, t_pad = 3, 4, 3
    lengths = torch.tensor([4, 2, 3])

    def make():
        x = torch.randn(b, t_valid, generator=g, dtype=D) * 0.5
        return x

    tensors = [make() for _ in range(8)]
    mask = torch.arange(t_valid)[None, :] < lengths[:, None]
    if fill is not None:
        pad = torch.full((b, t_pad), fill, dtype=D)
        tensors = [torch.cat([torch.where(mask, x, fill), pad], 1) for x in tensors]
        mask = torch.cat([mask, torch.zeros(b, t_pad, dtype=torch.bool)], 1)
    leaves = [x.clone().requires_grad_(True) for x in tensors]
    p1, p2, r1, r2, o1, pk, rk, _ = leaves
    adv = torch.tensor([1.0, -0.5, 0.3], dtype=D)
    des = torch.tensor([True, False, True])
    outs = [
        dpo_loss(p1, p2, r1, r2, mask, mask, humanline=humanline),
        kto_loss(p1, r1, mask, des, pk, rk, mask, humanline=humanline),
        grpo_loss(p1, o1, r1, mask, adv, beta=0.1, humanline=humanline, loss_type="grpo"),
        grpo_loss(p1, o1, r1, mask, adv, beta=0.1, humanline=humanline, loss_type="dapo"),
        sft_loss(p1, mask),
    ]
    grads = torch.autograd.grad(sum(o.loss for o in outs), leaves, allow_unused=True)
    return outs, grads, mask


@pytest.mark.parametrize("humanline", [None, (-0.3, 0.4), (0.1, 0.6)])
@pytest.mark.parametrize("fill", GARBAGE + [0.0])
def test_padding_garbage_changes_nothing(fill, humanline):
    ref_outs, ref_grads, ref_mask = _all_losses(None, humanline)
    outs, grads, mask = _all_losses(fill, humanline)
    for a, b in zip(ref_outs, outs):
        assert torch.isfinite(b.loss)
        assert val(b.loss) == pytest.approx(val(a.loss), abs=1e-12)
        assert torch.allclose(b.per_example, a.per_example)
        assert set(a.metrics) == set(b.metrics)
        for k in a.metrics:
            assert val(b.metrics[k]) == pytest.approx(val(a.metrics[k]), abs=1e-12), k
    for ga, gb in zip(ref_grads, grads):
        if ga is None:
            assert gb is None or bool((gb == 0).all())
            continue
        assert bool(torch.isfinite(gb).all())
        assert bool((gb[~mask] == 0).all())
        assert torch.allclose(gb[mask], ga[ref_mask])


# ----------------------------------------------------------------------------------- advantages


def test_group_advantages_hand():
    s = torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0, 0.0])
    gid = torch.tensor([7, 7, -2, -2, 100, 7])
    a = group_advantages(s, gid, scale=False)
    assert a.tolist() == pytest.approx([-1 / 3, 5 / 3, 0.0, 0.0, 0.0, -4 / 3])
    a = group_advantages(s, gid, eps=0.0)
    std = math.sqrt(((1 / 3) ** 2 + (5 / 3) ** 2 + (4 / 3) ** 2) / 3)
    assert a[[0, 1, 5]].tolist() == pytest.approx([-1 / 3 / std, 5 / 3 / std, -4 / 3 / std])
    assert a[[2, 3, 4]].tolist() == [0.0, 0.0, 0.0]
    # constant groups give exact zeros even when the mean rounds
    assert group_advantages(torch.tensor([0.1, 0.1, 0.1]), torch.zeros(3, dtype=torch.long)).tolist() \
        == [0.0, 0.0, 0.0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.floats(-100, 100)), min_size=1, max_size=30))
def test_group_advantages_properties(rows):
    gid = torch.tensor([g for g, _ in rows])
    s = torch.tensor([x for _, x in rows], dtype=D)
    centred = group_advantages(s, gid, scale=False)
    scaled = group_advantages(s, gid, eps=1e-4)
    for g in gid.unique():
        sel = gid == g
        assert abs(float(centred[sel].mean())) < 1e-9
        std = float(s[sel].std(unbiased=False))
        if float(s[sel].max()) == float(s[sel].min()):
            assert bool((scaled[sel] == 0).all())
        else:
            got = float(scaled[sel].std(unbiased=False))
            assert got == pytest.approx(std / (std + 1e-4), rel=1e-9, abs=1e-9)
            assert abs(float(scaled[sel].mean())) < 1e-9


# --------------------------------------------------------------------------------- reject mode


def test_reject_mask_reproducible_and_subset():
    torch.manual_seed(5)
    l = torch.randn(4, 16) * 0.1  # realistic: the lagging reference keeps ratios near 1
    m = torch.rand(4, 16) < 0.8
    l[~m] = math.nan
    a = humanline_reject_mask(l, m, gamma=2.0, generator=torch.Generator().manual_seed(0))
    b = humanline_reject_mask(l, m, gamma=2.0, generator=torch.Generator().manual_seed(0))
    c = humanline_reject_mask(l, m, gamma=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.bool and not bool((a & ~m).any())
    assert 0 < int(a.sum()) < int(m.sum())


def test_reject_mask_one_sided_keeps_max_and_gamma_monotone():
    torch.manual_seed(6)
    l = torch.randn(8, 32)
    m = torch.ones(8, 32, dtype=torch.bool)
    m[:, 30:] = False
    l[:, 30:] = 50.0  # padding with a huge ratio must not set M
    imax = torch.where(m, l, -math.inf).argmax()
    kept = []
    for gamma in (0.001, 1.0, 100.0):
        keep = humanline_reject_mask(l, m, gamma=gamma, two_sided=False,
                                     generator=torch.Generator().manual_seed(0))
        assert bool(keep.view(-1)[imax])
        kept.append(int(keep.sum()))
    assert kept[0] > 0.95 * int(m.sum())  # b ~ Beta(0.001, 1) is ~0: almost all kept
    assert kept[0] > kept[1] > kept[2]
    assert kept[2] < 0.1 * int(m.sum())  # b ~ 1: only tokens near the max survive
    both = humanline_reject_mask(l, m, gamma=1.0, generator=torch.Generator().manual_seed(0))
    assert int(both.sum()) <= kept[1]
    with pytest.raises(ValueError):
        humanline_reject_mask(l, m, gamma=0.0)
