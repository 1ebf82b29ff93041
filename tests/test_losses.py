"""Distillation losses against values computed by hand; the schema of a method's loss block."""
import copy
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

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


# ---------------------------------------------------------------------------------------------------------------
# Pluggable distillation losses (pipeline.losses.distill_loss). Reference values are computed below with plain
# Python floats and loops that follow each formula, never by calling the implementation.
# ---------------------------------------------------------------------------------------------------------------
from pipeline.config import validate_params  # noqa: E402
from pipeline.data.benchmark_configs import benchmark_params  # noqa: E402
from pipeline.losses import (LOSS_DEFAULTS, LOSSES, DistillLoss, build_distill_loss, loss_schema,  # noqa: E402
                             sinkhorn_distance, sinkhorn_plan)
from pipeline.schema import ConfigError, Field  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _cfg(name, **overrides):
    """A loss block: common keys as keyword arguments, a loss's own block as a dict (nd={"weight": 2.0})."""
    return {**LOSS_DEFAULTS, "name": name, **overrides}


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _sinkhorn_by_hand(student, teacher, T, eps, iters):
    """SinKD literally (rows, then columns, normalised to sum 1; loss summed), then divided by B."""
    ps = [_softmax([v / T for v in row]) for row in student]
    pt = [_softmax([v / T for v in row]) for row in teacher]
    B = len(ps)
    W = [[sum(abs(a - b) for a, b in zip(ps[i], pt[j])) for j in range(B)] for i in range(B)]
    P = [[math.exp(-W[i][j] / eps) for j in range(B)] for i in range(B)]
    for _ in range(iters):
        for i in range(B):
            r = sum(P[i])
            P[i] = [v / r for v in P[i]]
        for j in range(B):
            c = sum(P[i][j] for i in range(B))
            for i in range(B):
                P[i][j] /= c
    return sum(P[i][j] * W[i][j] for i in range(B) for j in range(B)) / B


def _binary_kl_by_hand(student, teacher, T):
    total = 0.0
    for zs_row, zt_row in zip(student, teacher):
        for zs, zt in zip(zs_row, zt_row):
            st, ss = _sigmoid(zt / T), _sigmoid(zs / T)
            total += st * math.log(st / ss) + (1 - st) * math.log((1 - st) / (1 - ss))
    return total


def test_defaults_and_names():
    assert tuple(LOSSES) == ("kl", "nd", "sinkhorn", "dual_head", "binary_kl", "binary_kl_norm", "soft_ce")
    assert LOSS_DEFAULTS == {"name": "kl", "weight": 1.0, "reduction": "batchmean", "temperature": 1.0,
                             "nd": {"weight": 1.0}, "sinkhorn": {"weight": 1.0, "epsilon": 0.1, "iters": 20},
                             "dual_head": {"alpha": 0.5, "beta": 1.0}}


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("reduction,denom", [("batchmean", 2), ("numel", 6)])
def test_kl_loss_matches_hand_values(T, reduction, denom):
    loss = build_distill_loss(_cfg("kl", weight=0.7, temperature=T, reduction=reduction), n_classes=3, feature_dim=4)
    total, parts = loss(torch.tensor(S), torch.tensor(T_))
    expected = 0.7 * T * T * _kl_by_hand(S, T_, T) / denom
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert parts == {"kl": pytest.approx(expected, rel=1e-5)}
    assert total.dtype == torch.float32 and total.dim() == 0


def test_temperature_factor_is_t_squared():
    # T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) == T^2 * [the T=1 loss on z/T]
    z_s, z_t = torch.tensor(S), torch.tensor(T_)
    at_t2 = build_distill_loss(_cfg("kl", temperature=2.0), n_classes=3, feature_dim=4)(z_s, z_t)[0]
    at_t1 = build_distill_loss(_cfg("kl", temperature=1.0), n_classes=3, feature_dim=4)(z_s / 2, z_t / 2)[0]
    assert at_t2.item() == pytest.approx(4.0 * at_t1.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["kl", "binary_kl", "sinkhorn", "binary_kl_norm", "soft_ce"])
def test_numel_reduction_is_batchmean_over_c_for_the_kd_term(name):
    z_s, z_t = torch.tensor(S), torch.tensor(T_)
    bm = build_distill_loss(_cfg(name, reduction="batchmean"), n_classes=3, feature_dim=4)(z_s, z_t)[1]
    ne = build_distill_loss(_cfg(name, reduction="numel"), n_classes=3, feature_dim=4)(z_s, z_t)[1]
    kd_part = "kl" if name == "sinkhorn" else name
    assert ne[kd_part] == pytest.approx(bm[kd_part] / 3, rel=1e-5)
    if name == "sinkhorn":                                   # the Sinkhorn term is not affected by `reduction`
        assert ne["sinkhorn"] == pytest.approx(bm["sinkhorn"], rel=1e-6)


def test_nd_matches_written_out_value():
    # f_s norms 5 and 0.7071 vs teacher norms 1 -> max norms 5 and 1. Teacher pseudo-labels: 2 and 1.
    # Centre 2 is [0, 0, 2] -> normalised to [0, 0, 1] defensively.
    # L_ND = 1/2 * [(1 - <[3,0,4],[0,0,1]>/5) + (1 - <[.5,.5,0],[0,1,0]>/1)] = 1/2 * (0.2 + 0.5) = 0.35
    f_s = torch.tensor([[3.0, 0.0, 4.0], [0.5, 0.5, 0.0]])
    f_t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    z_s = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]])
    z_t = torch.tensor([[0.0, 1.0, 5.0], [1.0, 4.0, 0.0]])
    loss = build_distill_loss(_cfg("nd", nd={"weight": 2.0}, weight=0.5), n_classes=3, feature_dim=3)
    total, parts = loss(z_s, z_t, f_s=f_s, f_t=f_t, class_centers=centres)
    kl = 0.5 * _kl_by_hand(z_s.tolist(), z_t.tolist(), 1.0) / 2
    assert parts["nd"] == pytest.approx(2.0 * 0.35, rel=1e-6)
    assert parts["kl"] == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(kl + 0.7, rel=1e-5)


def test_nd_gradient_reaches_student_features_only():
    f_s = torch.randn(4, 5, requires_grad=True)
    f_t = torch.nn.functional.normalize(torch.randn(4, 5), dim=-1).requires_grad_()
    centres = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1).requires_grad_()
    z_s, z_t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    loss = build_distill_loss(_cfg("nd"), n_classes=3, feature_dim=5)
    loss(z_s, z_t, f_s=f_s, f_t=f_t, class_centers=centres)[0].backward()
    assert f_s.grad is not None and z_s.grad is not None
    assert f_t.grad is None and centres.grad is None and z_t.grad is None


SK_S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, -1.0]]
SK_T = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 3.0, 0.0]]


@pytest.mark.parametrize("T,eps,iters", [(1.0, 0.1, 20), (2.0, 0.1, 20), (1.0, 0.5, 3), (2.0, 0.05, 1)])
def test_sinkhorn_matches_hand_values(T, eps, iters):
    loss = build_distill_loss(_cfg("sinkhorn", temperature=T, sinkhorn={"epsilon": eps, "iters": iters, "weight": 0.3},
                                   weight=2.0), n_classes=3, feature_dim=4)
    total, parts = loss(torch.tensor(SK_S), torch.tensor(SK_T))
    sk = 0.3 * _sinkhorn_by_hand(SK_S, SK_T, T, eps, iters)
    kl = 2.0 * T * T * _kl_by_hand(SK_S, SK_T, T) / 3
    assert parts["sinkhorn"] == pytest.approx(sk, rel=1e-5)
    assert parts["kl"] == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(sk + kl, rel=1e-5)


def test_sinkhorn_is_not_zero_when_student_equals_teacher():
    # B = 2 and p_s == p_t: W = [[0, d], [d, 0]], K = [[1, e], [e, 1]] with e = exp(-d/eps) is already balanced, so
    # P = 1/2 * [[1, e], [e, 1]] / (1 + e) and L = d * e / (1 + e) > 0; it tends to 0 as eps -> 0.
    z = [[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]]
    p = [_softmax(r) for r in z]
    d = sum(abs(a - b) for a, b in zip(p[0], p[1]))
    for eps in (0.1, 1.0, 0.02):
        e = math.exp(-d / eps)
        got = sinkhorn_distance(torch.tensor(z), torch.tensor(z), epsilon=eps, n_iters=20).item()
        assert got == pytest.approx(d * e / (1 + e), rel=1e-4, abs=1e-7)
    assert sinkhorn_distance(torch.tensor(z), torch.tensor(z), epsilon=1.0).item() > 0.1
    assert sinkhorn_distance(torch.tensor(z), torch.tensor(z), epsilon=0.02).item() < 1e-10
    same = torch.tensor([[1.0, 2.0, 3.0]] * 4)                  # every row identical: every cost is 0
    assert sinkhorn_distance(same, same).item() == pytest.approx(0.0, abs=1e-7)


def test_sinkhorn_plan_marginals():
    torch.manual_seed(0)
    B = 8
    cost = torch.rand(B, B) * 2
    row_error = {}
    for eps, iters in ((1.0, 20), (0.1, 20), (0.1, 300), (0.001, 50)):
        plan = sinkhorn_plan(-cost / eps, iters)
        assert torch.isfinite(plan).all() and (plan >= 0).all()          # log domain: no 0/0 even at eps=0.001
        assert torch.allclose(plan.sum(0), torch.full((B,), 1 / B), atol=1e-6)   # last step: exact columns
        assert plan.sum().item() == pytest.approx(1.0, abs=1e-5)
        row_error[eps, iters] = (plan.sum(1) * B - 1).abs().max().item()  # rows: only approximately 1/B
    assert row_error[1.0, 20] < 1e-5                 # a smooth kernel converges within SinKD's 20 rounds
    assert row_error[0.1, 20] < 0.15                 # a sharp one does not quite (about 7% here) ...
    assert row_error[0.1, 300] < 1e-4 < row_error[0.1, 20]   # ... but converges with more rounds
    # same plan as plain division (SinKD, unit marginals) up to the factor B
    K = torch.exp(-cost / 0.1).double()
    for _ in range(20):
        K = K / K.sum(1, keepdim=True)
        K = K / K.sum(0, keepdim=True)
    assert torch.allclose(sinkhorn_plan(-cost / 0.1, 20).double(), K / B, atol=1e-6)
    # the transported cost is at most the cost of the independent (uniform) coupling
    p_s, p_t = torch.softmax(torch.randn(B, 5), -1), torch.softmax(torch.randn(B, 5), -1)
    w = (p_s[:, None] - p_t[None]).abs().sum(-1)
    assert sinkhorn_distance(p_s.log(), p_t.log()).item() <= w.mean().item() + 1e-6


def test_sinkhorn_gradient_flows_through_the_plan_too():
    torch.manual_seed(1)
    z_s, z_t = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    sinkhorn_distance(z_s, z_t, epsilon=0.1).backward()
    full = z_s.grad.clone()
    z_s.grad = None
    p_s, p_t = torch.softmax(z_s, -1), torch.softmax(z_t, -1)
    w = (p_s[:, None] - p_t[None]).abs().sum(-1)
    (sinkhorn_plan(-w / 0.1, 20).detach() * w).sum().backward()
    assert not torch.allclose(full, z_s.grad, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("reduction,denom", [("batchmean", 2), ("numel", 6)])
def test_binary_kl_matches_hand_values(T, reduction, denom):
    loss = build_distill_loss(_cfg("binary_kl", weight=1.5, temperature=T, reduction=reduction),
                              n_classes=3, feature_dim=4)
    total, parts = loss(torch.tensor(S), torch.tensor(T_))
    expected = 1.5 * T * T * _binary_kl_by_hand(S, T_, T) / denom
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert set(parts) == {"binary_kl"}


def test_binary_kl_is_stable_and_zero_at_equality():
    loss = build_distill_loss(_cfg("binary_kl"), n_classes=3, feature_dim=4)
    z = torch.tensor([[300.0, -300.0, 0.0], [-80.0, 80.0, 5.0]])
    assert loss(z, z)[0].item() == pytest.approx(0.0, abs=1e-6)
    z_s = torch.tensor([[-300.0, 300.0, 0.0], [80.0, -80.0, 5.0]], requires_grad=True)
    total = loss(z_s, z)[0]
    total.backward()
    # saturated: a flipped element costs about |z_s| (-log sigmoid(-300) ~ 300): (300 + 300 + 80 + 80 + 0) / B = 380
    assert total.item() == pytest.approx(380.0, rel=1e-4) and torch.isfinite(z_s.grad).all()


# binary_kl_norm (DHKD's BinaryKLNorm): d = sigmoid((z_s - z_t)/T); per element 1/2 log(1/2 / d) + 1/2 log(1/2 / (1-d))
LN3, LN4 = math.log(3.0), math.log(4.0)
BKN_T = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
BKN_S = [[2 * LN3, 0.0, -2 * LN3], [1.0 + 2 * LN4, 1.0, 1.0]]     # z_t + T * x with T = 2


@pytest.mark.parametrize("reduction,expected", [
    # x = (z_s - z_t)/2 = [[ln 3, 0, -ln 3], [ln 4, 0, 0]], so d = sigmoid(x) = [[3/4, 1/2, 1/4], [4/5, 1/2, 1/2]].
    # d = 3/4 or 1/4: 1/2 log(2/3) + 1/2 log(2) = 1/2 log(4/3); d = 1/2: 1/2 log 1 + 1/2 log 1 = 0;
    # d = 4/5: 1/2 log(5/8) + 1/2 log(5/2) = 1/2 log(25/16) = log(5/4). Sum = log(4/3) + log(5/4) = log(5/3).
    # w = 1.5, T^2 = 4: batchmean 1.5 * 4 * log(5/3) / 2 = 3 log(5/3) = 1.532477; numel / 6: log(5/3) = 0.510826
    ("batchmean", 3 * math.log(5 / 3)), ("numel", math.log(5 / 3)),
])
def test_binary_kl_norm_matches_hand_values(reduction, expected):
    loss = build_distill_loss(_cfg("binary_kl_norm", weight=1.5, temperature=2.0, reduction=reduction),
                              n_classes=3, feature_dim=4)
    total, parts = loss(torch.tensor(BKN_S), torch.tensor(BKN_T))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert parts == {"binary_kl_norm": pytest.approx(expected, rel=1e-6)}


def _binary_kl_norm_by_hand(student, teacher, T):
    total = 0.0
    for zs_row, zt_row in zip(student, teacher):
        for zs, zt in zip(zs_row, zt_row):
            d = _sigmoid((zs - zt) / T)
            total += 0.5 * math.log(0.5 / d) + 0.5 * math.log(0.5 / (1 - d))
    return total


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_binary_kl_norm_matches_the_written_out_formula(T):
    loss = build_distill_loss(_cfg("binary_kl_norm", temperature=T), n_classes=3, feature_dim=4)
    assert loss(torch.tensor(S), torch.tensor(T_))[0].item() == pytest.approx(
        T * T * _binary_kl_norm_by_hand(S, T_, T) / 2, rel=1e-5)


def test_binary_kl_norm_zero_only_at_equality_stable_when_saturated():
    loss = build_distill_loss(_cfg("binary_kl_norm"), n_classes=3, feature_dim=4)
    z = torch.tensor([[300.0, -300.0, 0.0], [-80.0, 80.0, 5.0]])
    assert loss(z, z)[0].item() == pytest.approx(0.0, abs=1e-6)
    # a shift of every logit by 1 leaves the softmax (and kl) unchanged but not this loss:
    # d = sigmoid(1) per element: 1/2 log(1/2 / d) + 1/2 log(1/2 / (1-d)) = 0.120115 (= log cosh(1/2)); 6 elements,
    # B = 2
    d = 1 / (1 + math.exp(-1))
    shifted = 0.5 * math.log(0.5 / d) + 0.5 * math.log(0.5 / (1 - d))
    assert loss(z + 1, z)[0].item() == pytest.approx(6 * shifted / 2, rel=1e-5)
    # saturated: z_s - z_t = [600, -600, 0] at T = 1: d = 1 - e^-600 and e^-600, where the original's 1e-8 clamp
    # cuts the gradient. Element 1: 1/2 log(1/2 / 1) + 1/2 log(1/2 / e^-600) = 300 - log 2, element 2 the same,
    # element 3: 0, so L = 600 - 2 log 2; the gradient per element is tanh(x/2)/2 = +1/2, -1/2, 0.
    z_s = torch.tensor([[600.0, -600.0, 0.0]], requires_grad=True)
    total = loss(z_s, torch.zeros(1, 3))[0]
    total.backward()
    assert total.item() == pytest.approx(600 - 2 * math.log(2), rel=1e-6)
    assert z_s.grad[0].tolist() == pytest.approx([0.5, -0.5, 0.0], abs=1e-6)


# soft_ce (SinKD's DistillKL): -sum_k softmax(z_t/T)_k log softmax(z_s/T)_k, averaged; no T^2
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("reduction,denom", [("batchmean", 2), ("numel", 4)])
def test_soft_ce_matches_hand_values(T, reduction, denom):
    # z_t/T = [[0, 0], [0, 0]] -> p_t = [1/2, 1/2] in both rows;
    # z_s/T = [[ln 3, 0], [0, 0]] -> p_s = [3/4, 1/4] and [1/2, 1/2]
    # row 1: -1/2 log(3/4) - 1/2 log(1/4) = 1/2 log(4/3) + log 2 = 1/2 log(16/3); row 2: log 2 (the teacher entropy)
    # sum = 1/2 log(16/3) + log 2 = 1/2 log(64/3) = 1.530153; batchmean / 2 = 0.765077, numel / 4 = 0.382538.
    # The same at T = 2 with the logits doubled: no T^2 factor. w = 0.8 multiplies it.
    total_by_hand = 0.5 * math.log(64 / 3)
    loss = build_distill_loss(_cfg("soft_ce", weight=0.8, temperature=T, reduction=reduction), n_classes=2,
                              feature_dim=4)
    total, parts = loss(torch.tensor([[T * LN3, 0.0], [0.0, 0.0]]), torch.zeros(2, 2))
    assert total.item() == pytest.approx(0.8 * total_by_hand / denom, rel=1e-6)
    assert parts == {"soft_ce": pytest.approx(0.8 * total_by_hand / denom, rel=1e-6)}


def test_soft_ce_is_the_teacher_entropy_at_equality_and_has_the_kl_gradient_over_t_squared():
    loss = build_distill_loss(_cfg("soft_ce", temperature=2.0), n_classes=3, feature_dim=4)
    z = torch.tensor(T_)
    entropy = sum(-sum(p * math.log(p) for p in _softmax([v / 2.0 for v in row])) for row in T_) / 2
    assert loss(z, z)[0].item() == pytest.approx(entropy, rel=1e-6) and entropy > 1.0
    # = H(p_t) + KL(p_t || p_s), by hand on S, T_
    cross = -sum(sum(pt * qs for pt, qs in zip(_softmax([v / 2 for v in zt]), _log_softmax([v / 2 for v in zs])))
                 for zs, zt in zip(S, T_)) / 2
    assert loss(torch.tensor(S), z)[0].item() == pytest.approx(cross, rel=1e-6)
    assert cross == pytest.approx(_kl_by_hand(S, T_, 2.0) / 2 + entropy, rel=1e-9)
    grads = {}
    for name in ("soft_ce", "kl"):
        z_s = torch.tensor(S, requires_grad=True)
        build_distill_loss(_cfg(name, temperature=2.0), n_classes=3, feature_dim=4)(z_s, z)[0].backward()
        grads[name] = z_s.grad
    assert torch.allclose(grads["soft_ce"] * 4.0, grads["kl"], atol=1e-6)


CENTRES = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def _dual(alpha=0.5, beta=1.0, **kw):
    loss = build_distill_loss(_cfg("dual_head", dual_head={"alpha": alpha, "beta": beta}, **kw), n_classes=3,
                              feature_dim=3)
    loss.init_head(torch.tensor(CENTRES) * 2.0, scale=10.0)    # centres are normalised, so weight = 10 * identity
    return loss


F_S = [[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]]                      # unit: [.6, .8, 0] and [0, 0, -1]
HEAD = [[6.0, 8.0, 0.0], [0.0, 0.0, -10.0]]                    # 10 * <unit f_s, centre_k>, zero bias


def test_dual_head_loss_matches_hand_values():
    loss = _dual(weight=0.8, temperature=2.0)
    z_s, z_t = torch.tensor(S), torch.tensor(T_)               # teacher pseudo-labels: 0 and 0 (tie -> first)
    total, parts = loss(z_s, z_t, f_s=torch.tensor(F_S))
    ce = -(_log_softmax(HEAD[0])[0] + _log_softmax(HEAD[1])[0]) / 2
    kl = 0.8 * 4.0 * _kl_by_hand(S, T_, 2.0) / 2
    assert parts["ce"] == pytest.approx(0.5 * ce, rel=1e-5)
    assert parts["kl"] == pytest.approx(0.5 * kl, rel=1e-5)
    assert total.item() == pytest.approx(0.5 * ce + 0.5 * kl, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.3])
def test_dual_head_inference_combination(alpha):
    beta = 2.0
    loss = _dual(alpha=alpha, beta=beta)
    got = loss.inference_logits(torch.tensor(S), torch.tensor(F_S))
    for i in range(2):
        p_head = _softmax(HEAD[i])
        p_kd = _softmax([v / beta for v in S[i]])
        expected = [math.log((1 - alpha) * a + alpha * b) for a, b in zip(p_head, p_kd)]
        assert got[i].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if alpha == 0.0:      # the CE head alone
        assert torch.allclose(got, torch.log_softmax(torch.tensor(HEAD), -1), atol=1e-6)
    if alpha == 1.0:      # the student logits alone, at temperature beta
        assert torch.allclose(got, torch.log_softmax(torch.tensor(S) / beta, -1), atol=1e-6)


def test_dual_head_parameters_state_and_gradients():
    loss = build_distill_loss(_cfg("dual_head"), n_classes=3, feature_dim=5)
    assert loss.head.bias.abs().sum().item() == 0 and loss.head.weight.abs().max().item() < 0.1
    assert {n for n, _ in loss.named_parameters()} == {"head.weight", "head.bias"}
    assert set(loss.state_dict()) == {"head.weight", "head.bias"}
    f_s = torch.randn(4, 5, requires_grad=True)
    z_s, z_t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    loss(z_s, z_t, f_s=f_s)[0].backward()
    assert loss.head.weight.grad is not None and f_s.grad is not None and z_s.grad is not None
    assert z_t.grad is None
    other = build_distill_loss(_cfg("dual_head"), n_classes=3, feature_dim=5)
    other.load_state_dict(loss.state_dict())
    assert torch.equal(other.head.weight, loss.head.weight)
    for name in [n for n in LOSSES if n != "dual_head"]:
        plain = build_distill_loss(_cfg(name), n_classes=3, feature_dim=5)
        assert list(plain.parameters()) == [] and plain.state_dict() == {}
        z = torch.randn(2, 3)
        assert plain.inference_logits(z, None) is z
        with pytest.raises(ValueError, match=f"'{name}' loss has no head"):
            plain.init_head(torch.randn(3, 5), 100.0)


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_gives_gradient_to_student_only_in_float32(name):
    f_s = torch.randn(5, 4, requires_grad=True)
    f_t = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    centres = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    z_s = torch.randn(5, 3, dtype=torch.bfloat16, requires_grad=True)
    z_t = torch.randn(5, 3, dtype=torch.float16, requires_grad=True)
    loss = build_distill_loss(_cfg(name), n_classes=3, feature_dim=4)
    total, parts = loss(z_s, z_t, f_s=f_s, f_t=f_t, class_centers=centres)
    assert total.dtype == torch.float32
    assert sum(parts.values()) == pytest.approx(total.item(), rel=1e-5)
    assert all(isinstance(v, float) for v in parts.values())
    total.backward()
    assert z_s.grad is not None and torch.isfinite(z_s.grad.float()).all() and z_t.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_runs_on_cuda(name):
    dev = "cuda"
    loss = build_distill_loss(_cfg(name), n_classes=3, feature_dim=4).to(dev)
    f_s = torch.randn(5, 4, device=dev)
    f_t = torch.nn.functional.normalize(torch.randn(5, 4, device=dev), dim=-1)
    centres = torch.nn.functional.normalize(torch.randn(3, 4, device=dev), dim=-1)
    total, _ = loss(torch.randn(5, 3, device=dev), torch.randn(5, 3, device=dev), f_s=f_s, f_t=f_t,
                    class_centers=centres)
    assert total.device.type == "cuda" and torch.isfinite(total)
    assert loss.inference_logits(torch.randn(5, 3, device=dev), f_s).device.type == "cuda"


@pytest.mark.parametrize("name,missing", [("nd", "f_s"), ("nd", "f_t"), ("nd", "class_centers"),
                                          ("dual_head", "f_s")])
def test_missing_input_names_the_loss_and_the_input(name, missing):
    inputs = {"f_s": torch.randn(2, 4), "f_t": torch.randn(2, 4), "class_centers": torch.randn(3, 4)}
    inputs[missing] = None
    loss = build_distill_loss(_cfg(name), n_classes=3, feature_dim=4)
    with pytest.raises(ValueError, match=rf"'{name}'.* needs {missing}\b"):
        loss(torch.randn(2, 3), torch.randn(2, 3), **inputs)
    if name == "dual_head":
        with pytest.raises(ValueError, match=r"'dual_head'.* needs f_s\b"):
            loss.inference_logits(torch.randn(2, 3), None)


def test_shape_mismatches_are_errors():
    loss = build_distill_loss(_cfg("nd"), n_classes=3, feature_dim=4)
    with pytest.raises(ValueError, match=r"must both be \[B, 3\]"):
        loss(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"f_s \(2, 5\) must be \[B, 4\]"):
        loss(torch.randn(2, 3), torch.randn(2, 3), f_s=torch.randn(2, 5), f_t=torch.randn(2, 5),
             class_centers=torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"class_centers \(2, 4\)"):
        loss(torch.randn(2, 3), torch.randn(2, 3), f_s=torch.randn(2, 4), f_t=torch.randn(2, 4),
             class_centers=torch.randn(2, 4))


@pytest.mark.parametrize("key,value", [
    ("name", "dkd"), ("weight", -1.0), ("weight", "1"), ("reduction", "mean"), ("temperature", 0.0),
    ("nd.weight", True), ("sinkhorn.weight", float("nan")), ("sinkhorn.epsilon", 0), ("sinkhorn.iters", 0),
    ("sinkhorn.iters", 2.5), ("dual_head.alpha", 1.5), ("dual_head.alpha", -0.1), ("dual_head.beta", -2.0),
])
def test_bad_value_names_the_key(key, value):
    cfg = copy.deepcopy(LOSS_DEFAULTS)
    block, _, field = key.rpartition(".")
    (cfg[block] if block else cfg)[field] = value
    with pytest.raises(ConfigError, match=rf"loss\.{re.escape(key)}: expected"):
        build_distill_loss(cfg, n_classes=3, feature_dim=4)


def test_unknown_block_key_or_missing_common_key_is_named():
    with pytest.raises(ConfigError, match=r"loss\.temprature: unknown key"):
        build_distill_loss({**LOSS_DEFAULTS, "temprature": 2.0}, n_classes=3, feature_dim=4)
    with pytest.raises(ConfigError, match=r"loss\.kl: unknown key"):   # kl has no settings of its own
        build_distill_loss({**LOSS_DEFAULTS, "kl": {"weight": 2.0}}, n_classes=3, feature_dim=4)
    with pytest.raises(ConfigError, match=r"loss\.sinkhorn\.eps: unknown key; allowed keys here: "
                                          r"\['epsilon', 'iters', 'weight'\]"):
        build_distill_loss(_cfg("sinkhorn", sinkhorn={"eps": 0.05}), n_classes=3, feature_dim=4)
    with pytest.raises(ConfigError, match=r"loss\.nd_weight: unknown key"):     # the old flat shape
        build_distill_loss({**LOSS_DEFAULTS, "nd_weight": 1.0}, n_classes=3, feature_dim=4)
    with pytest.raises(ConfigError, match=r"loss\.nd: expected a mapping"):
        build_distill_loss(_cfg("nd", nd=2.0), n_classes=3, feature_dim=4)
    cfg = dict(LOSS_DEFAULTS)
    del cfg["temperature"]                        # the common keys have no default: a KD weight needs its T
    with pytest.raises(ConfigError, match=r"loss\.temperature: missing"):
        build_distill_loss(cfg, n_classes=3, feature_dim=4)
    with pytest.raises(ValueError, match="n_classes"):
        build_distill_loss(dict(LOSS_DEFAULTS), n_classes=0, feature_dim=4)
    assert isinstance(build_distill_loss(dict(LOSS_DEFAULTS), n_classes=3, feature_dim=4), DistillLoss)


def test_every_problem_is_listed_at_once():
    cfg = _cfg("sinkhorn", sinkhorn={"epsilon": -1.0}, dual_head={"alpha": 2.0})
    with pytest.raises(ConfigError) as info:
        build_distill_loss(cfg, n_classes=3, feature_dim=4)
    assert "loss.sinkhorn.epsilon: expected a number > 0.0, got -1.0" in str(info.value)
    assert "loss.dual_head.alpha: expected a number >= 0.0 and <= 1.0, got 2.0" in str(info.value)


def test_blocks_are_optional_and_take_their_defaults():
    bare = {"name": "kl", "weight": 1.0, "reduction": "batchmean", "temperature": 1.0}
    loss = build_distill_loss(bare, n_classes=3, feature_dim=4)
    assert loss.cfg == LOSS_DEFAULTS and bare == {"name": "kl", "weight": 1.0, "reduction": "batchmean",
                                                  "temperature": 1.0}        # filled into a copy
    partial = build_distill_loss({**bare, "name": "sinkhorn", "sinkhorn": {"epsilon": 0.05}},
                                 n_classes=3, feature_dim=4)
    assert partial.cfg["sinkhorn"] == {"epsilon": 0.05, "weight": 1.0, "iters": 20}
    assert build_distill_loss({**bare, "name": "dual_head"}, n_classes=3, feature_dim=4).alpha == 0.5
    # the shallow copies other tests and modules make ({**LOSS_DEFAULTS, ...}) never change LOSS_DEFAULTS
    before = copy.deepcopy(LOSS_DEFAULTS)
    build_distill_loss({**LOSS_DEFAULTS, "name": "sinkhorn"}, n_classes=3, feature_dim=4)
    assert LOSS_DEFAULTS == before


def test_params_files_validate_with_and_without_blocks():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    kd = params["distill"]["promptkd"]["loss"]
    assert {k: kd[k] for k in LOSS_DEFAULTS} == LOSS_DEFAULTS   # the digits params.yaml = the library defaults
    for block in ("nd", "sinkhorn", "dual_head"):
        del kd[block]
    kd["sinkhorn"] = {"iters": 5}
    loss = validate_params(params)["distill"]["promptkd"]["loss"]
    assert loss == {**LOSS_DEFAULTS, "sinkhorn": {"iters": 5, "weight": 1.0, "epsilon": 0.1}}
    kd["dual_head"] = {"alpha": 1.5}
    kd["binary_kl_norm"] = {}
    with pytest.raises(ConfigError) as info:
        validate_params(params)
    assert "distill.promptkd.loss.dual_head.alpha: expected a number >= 0.0 and <= 1.0, got 1.5" in str(info.value)
    assert "distill.promptkd.loss.binary_kl_norm: unknown key" in str(info.value)


def test_a_left_out_loss_block_takes_the_methods_published_setting():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["distill"]["promptkd"]["loss"], params["distill"]["ekda"]["loss"]
    d = validate_params(params)["distill"]
    assert {k: d["promptkd"]["loss"][k] for k in ("name", "weight", "reduction", "temperature")} == \
        {"name": "kl", "weight": 1000.0, "reduction": "numel", "temperature": 1.0}   # PromptKD's KD_WEIGHT
    assert (d["ekda"]["loss"]["weight"], d["ekda"]["loss"]["reduction"]) == (100.0, "numel")   # EKDA's


def test_registry_entries_are_complete():
    for name, cls in LOSSES.items():
        assert issubclass(cls, DistillLoss) and cls.name == name
        assert set(cls.required_inputs) <= {"f_s", "f_t", "class_centers"}
        assert all(isinstance(f, Field) and f.has_default for f in cls.params.values())
        assert name in loss_schema() if cls.params else name not in loss_schema()
        loss = build_distill_loss(_cfg(name), n_classes=3, feature_dim=4)
        assert type(loss) is cls and loss.required_inputs == cls.required_inputs


def test_benchmark_configs_use_the_published_kd_settings():
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    kd = base["distill"]["promptkd"]["loss"]
    assert (kd["weight"], kd["reduction"]) == (1.0, "batchmean")
    distill = benchmark_params(base, "office31")["distill"]
    loss = distill["promptkd"]["loss"]
    assert (loss["weight"], loss["reduction"], loss["temperature"]) == (1000.0, "numel", 1.0)
    assert (distill["ekda"]["loss"]["weight"], distill["ekda"]["loss"]["reduction"]) == (100.0, "numel")
