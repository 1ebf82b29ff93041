"""KL distillation against values computed by hand."""
import math

import pytest
import torch

from pipeline.losses.kd import kl_divergence


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _kl_by_hand(student, teacher, T):
    total = 0.0
    for zs, zt in zip(student, teacher):
        p = _softmax([v / T for v in zt])
        q = _softmax([v / T for v in zs])
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return total


S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T_ = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_batchmean_and_numel_match_hand_values(T):
    s, t = torch.tensor(S), torch.tensor(T_)
    total = _kl_by_hand(S, T_, T)
    bm = kl_divergence(s, t, temperature=T, reduction="batchmean")
    ne = kl_divergence(s, t, temperature=T, reduction="numel")
    assert bm.item() == pytest.approx(T * T * total / 2, rel=1e-5)   # / B
    assert ne.item() == pytest.approx(T * T * total / 6, rel=1e-5)   # / (B * C)
    assert bm.item() == pytest.approx(ne.item() * 3, rel=1e-5)       # the KD-weight conversion factor is C


def test_zero_when_equal_and_teacher_gets_no_gradient():
    z = torch.randn(4, 5)
    assert kl_divergence(z, z).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    kl_divergence(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="reduction 'mean'"):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3), reduction="mean")
