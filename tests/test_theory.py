"""Tests of humanline.theory against textbook values and the defining identities of CPT."""

from __future__ import annotations

import math

import pytest
import torch

from humanline.theory import (
    cpt_decision_weights,
    kt_value,
    perceived_distribution,
    prelec_weight,
    prospect_value,
    tk_weight,
)

# w(p) = p^g / (p^g + (1-p)^g)^(1/g), evaluated independently (mpmath, 30 digits)
TK_061 = {0.01: 0.0552661368, 0.05: 0.1316257012, 0.5: 0.4206393543, 0.9: 0.7117160639}
TK_069_HALF = 0.4539875495


def test_tk_weight_textbook_values_and_ends():
    for p, w in TK_061.items():
        assert tk_weight(p) == pytest.approx(w, abs=1e-9)
    assert tk_weight(0.5, 0.69) == pytest.approx(TK_069_HALF, abs=1e-9)
    assert tk_weight(0.0) == 0.0 and tk_weight(1.0) == 1.0
    ps = torch.tensor([0.0, 0.01, 0.5, 1.0], dtype=torch.float64)
    assert tk_weight(ps).tolist() == pytest.approx([0.0, TK_061[0.01], TK_061[0.5], 1.0])
    with pytest.raises(ValueError):
        tk_weight(1.5)


def test_tk_weight_inverse_s():
    # over-weights rare outcomes, under-weights moderate and likely ones; crosses near p = 0.34
    for p in (0.001, 0.01, 0.1, 0.3):
        assert tk_weight(p) > p
    for p in (0.4, 0.5, 0.9, 0.99):
        assert tk_weight(p) < p
    assert tk_weight(1.0, gamma=1.0) == 1.0 and tk_weight(0.3, gamma=1.0) == pytest.approx(0.3)


def test_prelec_weight():
    for alpha in (0.3, 0.65, 0.9):
        assert prelec_weight(1 / math.e, alpha) == pytest.approx(1 / math.e, abs=1e-12)
    assert prelec_weight(0.0) == 0.0 and prelec_weight(1.0) == 1.0
    assert prelec_weight(0.01) > 0.01 and prelec_weight(0.9) < 0.9
    assert prelec_weight(0.5) == pytest.approx(math.exp(-(math.log(2) ** 0.65)))
    ps = torch.tensor([0.0, 0.01, 1 / math.e, 1.0], dtype=torch.float64)
    got = prelec_weight(ps).tolist()
    assert got == pytest.approx([0.0, prelec_weight(0.01), 1 / math.e, 1.0])
    with pytest.raises(ValueError):
        prelec_weight(-0.1)


def test_kt_value():
    assert kt_value(0.0) == 0.0
    assert kt_value(10.0) == pytest.approx(10**0.88)
    for x in (0.5, 1.0, 7.0):
        assert kt_value(-x) == pytest.approx(-2.25 * kt_value(x))  # loss aversion, alpha == beta
    assert kt_value(2.0) - kt_value(1.0) < kt_value(1.0) - kt_value(0.0)  # concave for gains
    assert kt_value(5.0, reference=3.0) == pytest.approx(kt_value(2.0))
    assert kt_value(-2.0, alpha=1.0, beta=0.5, lam=1.0) == pytest.approx(-math.sqrt(2))
    z = torch.tensor([-4.0, -1.0, 0.0, 1.0, 4.0], dtype=torch.float64)
    v = kt_value(z)
    assert v.tolist() == pytest.approx([kt_value(float(x)) for x in z])
    assert bool(torch.isfinite(v).all())


def test_cpt_all_gains_hand_and_sum():
    pi = cpt_decision_weights([1.0, 2.0, 3.0], [0.2, 0.3, 0.5])
    w = tk_weight
    assert pi.tolist() == pytest.approx([1 - w(0.8), w(0.8) - w(0.5), w(0.5)])
    assert float(pi.sum()) == pytest.approx(1.0)  # telescopes to w(1)
    # order of the input does not matter
    pi2 = cpt_decision_weights([3.0, 1.0, 2.0], [0.5, 0.2, 0.3]).tolist()
    a, b, c = pi.tolist()
    assert pi2 == pytest.approx([c, a, b])


def test_cpt_all_losses_mirrored():
    pi = cpt_decision_weights([-1.0, -2.0, -3.0], [0.2, 0.3, 0.5])
    w = lambda p: tk_weight(p, 0.69)  # noqa: E731
    # losses rank from the worst: P(X <= -3) = 0.5, P(X <= -2) = 0.8
    assert pi.tolist() == pytest.approx([1 - w(0.8), w(0.8) - w(0.5), w(0.5)])
    assert float(pi.sum()) == pytest.approx(1.0)


def test_cpt_mixed_sums_to_w_gain_plus_w_loss():
    pi = cpt_decision_weights([-1.0, 2.0, 5.0], [0.5, 0.3, 0.2])
    gains = float(pi[1:].sum())
    losses = float(pi[0])
    assert gains == pytest.approx(tk_weight(0.5, 0.61))
    assert losses == pytest.approx(tk_weight(0.5, 0.69))
    assert float(pi.sum()) == pytest.approx(TK_061[0.5] + TK_069_HALF)  # not 1
    # the reference point decides what is a gain: 0 counts as a gain, 0.5 moves it to the losses
    pi_ref = cpt_decision_weights([0.0, 1.0], [0.5, 0.5], reference=0.5)
    assert pi_ref.tolist() == pytest.approx([tk_weight(0.5, 0.69), tk_weight(0.5, 0.61)])


def test_cpt_ties_identity_and_custom_weighting():
    tied = cpt_decision_weights([1.0, 2.0, 2.0, 3.0], [0.2, 0.1, 0.2, 0.5])
    a, b, c = cpt_decision_weights([1.0, 2.0, 3.0], [0.2, 0.3, 0.5]).tolist()
    assert tied.tolist() == pytest.approx([a, b / 3, 2 * b / 3, c])
    p = [0.1, 0.2, 0.3, 0.4]
    ident = cpt_decision_weights([-2.0, -1.0, 1.0, 2.0], p, weighting=lambda q, g: q)
    assert ident.tolist() == pytest.approx(p)
    pre = cpt_decision_weights([1.0, 2.0], [0.5, 0.5], weighting=prelec_weight, gamma_gain=0.65)
    assert pre.tolist() == pytest.approx([1 - prelec_weight(0.5), prelec_weight(0.5)])
    zero = cpt_decision_weights([1.0, 2.0], [1.0, 0.0])
    assert zero.tolist() == pytest.approx([1.0, 0.0])


def test_perceived_distribution_overweights_rare():
    q = perceived_distribution([0.0, 1.0], [0.99, 0.01])
    assert float(q.sum()) == pytest.approx(1.0)
    assert float(q[1]) == pytest.approx(TK_061[0.01], abs=1e-9)
    mixed = perceived_distribution([-1.0, 2.0, 5.0], [0.5, 0.3, 0.2])
    assert float(mixed.sum()) == pytest.approx(1.0) and bool((mixed > 0).all())


def test_prospect_value():
    assert prospect_value([10.0], [1.0]) == pytest.approx(10**0.88)
    # 50/50 gamble of +-100: 100^0.88 (w+(.5) - 2.25 w-(.5)) < 0: rejected, as people do
    v = prospect_value([-100.0, 100.0], [0.5, 0.5])
    assert v == pytest.approx(100**0.88 * (TK_061[0.5] - 2.25 * TK_069_HALF))
    assert v < 0
    assert prospect_value([103.0, 97.0], [0.5, 0.5], reference=100.0) == pytest.approx(
        prospect_value([3.0, -3.0], [0.5, 0.5]))


def test_distribution_validation():
    for outcomes, probs in [([1.0, 2.0], [0.5, 0.6]), ([1.0], [-1.0]), ([1.0, 2.0], [1.0]), ([], [])]:
        with pytest.raises(ValueError):
            cpt_decision_weights(outcomes, probs)
