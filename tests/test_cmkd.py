"""CMKD building blocks: every loss term against values worked out by hand, the model, one step, RST and residuals.

Hand values use tiny logits whose softmax is exact: softmax([0, ln 3]) = (1/4, 3/4), softmax([ln 99, 0]) =
(0.99, 0.01), softmax([0, 0]) = (1/2, 1/2).
"""
import copy
import math

import pytest
import torch

from pipeline.methods.cmkd import (DEFAULT_CFG, CmkdModel, TaskHead, calibrated_alpha, cmkd_losses, cmkd_optimizer,
                                   cmkd_step, fixmatch_losses, gini_impurity, lr_factor, warmup_lambda)
from pipeline.methods.training import TrainingDiverged
from pipeline.models.residual import (RstProjection, dsp_counts, frozen_copy, load_residual, project_,
                                      save_residual, visual_weights_hash)

LN3, LN99 = math.log(3.0), math.log(99.0)
LAMBDA_MAX = 0.46211715726  # 2 / (1 + e^-1) - 1 = (e - 1) / (e + 1)
DIGITS = [str(k) for k in range(10)]
DIGITS_TEMPLATE = 'a photo of the number: "{}"'


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# --- losses -------------------------------------------------------------------------------------------------------

def test_gini_impurity_weighted_sum_and_detached_class_mass():
    probs = t([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]).requires_grad_(True)
    weights = t([1.0, 0.5, 2.0])
    # class mass (1.5, 1.5); row impurities 1 - 1/1.5 = 1/3, 1 - (0.25 + 0.25)/1.5 = 2/3, 1 - 1/1.5 = 1/3
    gi = gini_impurity(probs, weights)
    assert gi.item() == pytest.approx(1.0 * 1 / 3 + 0.5 * 2 / 3 + 2.0 * 1 / 3)  # = 4/3: summed, not averaged
    assert gini_impurity(probs).item() == pytest.approx(1 / 3 + 2 / 3 + 1 / 3)
    # with the mass held constant, d/dP_ik = -2 w_i P_ik / 1.5
    gi.backward()
    expected = t([[-2 * 1.0 * 1.0 / 1.5, 0.0], [-2 * 0.5 * 0.5 / 1.5] * 2, [0.0, -2 * 2.0 * 1.0 / 1.5]])
    assert torch.allclose(probs.grad, expected)


def test_gini_impurity_class_with_no_mass_is_finite():
    probs = t([[1.0, 0.0], [1.0, 0.0]]).requires_grad_(True)  # class 1 has zero mass on every row
    gi = gini_impurity(probs)
    gi.backward()
    assert gi.item() == pytest.approx(2 * (1 - 1 / 2))
    assert torch.isfinite(probs.grad).all()


def test_calibrated_alpha_uses_the_codes_kl_direction():
    p_g = t([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
    p_h = t([[0.25, 0.75], [0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    alpha = calibrated_alpha(p_g, p_h)
    # row 0: KL(p_g||p_h) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3), alpha = (3/4)^0.5 = 0.8660;
    # the paper's KL(p_h||p_g) = 0.25 ln 0.5 + 0.75 ln 1.5 = 0.1308 would give 0.8774
    # row 2: 1 ln(1/0.5) = ln 2 -> 1/2 (0 log 0 = 0); row 3: p_h = 0 where p_g > 0 -> KL = inf -> alpha = 0
    assert alpha.tolist() == pytest.approx([0.8660254038, 1.0, 0.5, 0.0])
    assert not alpha.requires_grad


def test_warmup_lambda():
    assert warmup_lambda(0) == 0.0
    assert warmup_lambda(1) == pytest.approx(4.99999999958e-5, rel=1e-9)  # tanh(0.5e-4)
    assert warmup_lambda(5000) == pytest.approx(0.24491866240)  # tanh(0.25)
    assert warmup_lambda(10000) == pytest.approx(LAMBDA_MAX)
    assert warmup_lambda(40000) == pytest.approx(LAMBDA_MAX)  # capped at max_iter: stays 0.462
    assert warmup_lambda(20, max_iter=10) == pytest.approx(LAMBDA_MAX)


def cmkd_inputs():
    h_s, y_s = t([[LN3, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])   # p = (3/4, 1/4), (1/2, 1/2)
    h_t = t([[0.0, LN3], [0.0, 0.0]])                              # p_h = (1/4, 3/4), (1/2, 1/2)
    g_t = t([[0.0, 0.0], [0.0, 0.0]])                              # p_g = (1/2, 1/2) twice
    g_s = t([[0.0, LN3], [0.0, 0.0]])                              # (1/4, 3/4), (1/2, 1/2)
    return h_s, y_s, h_t, g_t, g_s


def test_cmkd_terms_by_hand():
    losses, stats = cmkd_losses(*cmkd_inputs(), t=20000, lambdas=(0.25, 0.1, 0.025), label_smoothing=0.1,
                                lambda_max_iter=10000)
    lam = LAMBDA_MAX
    a0 = math.sqrt(0.75)  # alpha of row 0 (row 1: p_g = p_h, alpha = 1)
    # smoothed targets (0.95, 0.05) for label 0; row 1 is uniform: CE = ln 2 whatever the target
    cls = (-(0.95 * math.log(0.75) + 0.05 * math.log(0.25)) + math.log(2)) / 2
    # p_h class mass (0.75, 1.25): both rows have impurity 1 - (1/16)/0.75 - (9/16)/1.25 = 7/15
    task = 0.25 * lam * (a0 * 7 / 15 + 1.0 * 7 / 15)
    # mixture (3/8, 5/8), (1/2, 1/2), mass (0.875, 1.125); only row 0 has weight 1 - alpha > 0
    distill = 0.25 * lam * (1 - a0) * (1 - 0.140625 / 0.875 - 0.390625 / 1.125)
    reg_ce = 0.1 * (math.log(4) + math.log(2)) / 2
    reg_gini = 0.025 * lam * 2 * (1 - 0.25 / 1.0 - 0.25 / 1.0)
    expected = {"cls": cls, "task": task, "distill": distill, "reg_ce": reg_ce, "reg_gini": reg_gini}
    assert set(losses) == set(expected)
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-6), key
    assert sum(losses.values()).item() == pytest.approx(sum(expected.values()), rel=1e-6)
    assert stats == pytest.approx({"alpha_mean": (a0 + 1) / 2, "lambda": lam})
    # iteration 0: lambda = 0, only the two CE terms remain
    at0, _ = cmkd_losses(*cmkd_inputs(), t=0, lambdas=(0.25, 0.1, 0.025), label_smoothing=0.1)
    assert [at0[k].item() for k in ("task", "distill", "reg_gini")] == [0.0, 0.0, 0.0]


def test_cmkd_gradient_paths():
    torch.manual_seed(0)
    h_s, g_s, h_t, g_t = (torch.randn(4, 3, requires_grad=True) for _ in range(4))
    losses, _ = cmkd_losses(h_s, torch.tensor([0, 1, 2, 0]), h_t, g_t, g_s, t=10000, lambdas=(0.25, 0.1, 0.025),
                            label_smoothing=0.1)

    def grads(term):
        return torch.autograd.grad(losses[term], [h_t, g_t], retain_graph=True, allow_unused=True)

    # alpha and the mixture's p_g are detached: task and distill reach the task head only
    for term in ("task", "distill"):
        d_h, d_g = grads(term)
        assert d_h is not None and d_h.abs().sum() > 0 and d_g is None, term
    d_h, d_g = grads("reg_gini")  # the regulariser keeps p_g's gradient
    assert d_h is None and d_g.abs().sum() > 0


def test_fixmatch_mask_and_full_batch_mean():
    h_weak = t([[LN99, 0.0], [0.0, LN99], [0.0, 0.0], [LN3, 0.0]]).requires_grad_(True)  # max 0.99 .99 .5 .75
    h_strong = t([[0.0, 0.0], [0.0, LN3], [5.0, -5.0], [-5.0, 5.0]]).requires_grad_(True)
    g_weak = t([[0.0, 0.0], [0.0, 0.0], [LN99, 0.0], [0.0, 0.0]]).requires_grad_(True)
    g_strong = t([[3.0, -3.0], [3.0, -3.0], [0.0, LN3], [3.0, -3.0]]).requires_grad_(True)
    losses, stats = fixmatch_losses(h_weak, g_weak, h_strong, g_strong, threshold=0.95, weight=0.5)
    # h: rows 0, 1 pass with labels 0, 1: CE ln 2 and -ln(3/4), divided by the batch of 4 (not by the 2 kept)
    assert losses["fm_h"].item() == pytest.approx(0.5 * (math.log(2) - math.log(0.75)) / 4, rel=1e-6)
    # g: only row 2 passes, label 0, CE of (1/4, 3/4) = ln 4
    assert losses["fm_g"].item() == pytest.approx(0.5 * math.log(4) / 4, rel=1e-6)
    assert stats == {"mask_h": 0.5, "mask_g": 0.25}
    (losses["fm_h"] + losses["fm_g"]).backward()
    assert h_weak.grad is None and g_weak.grad is None  # pseudo-labels carry no gradient
    assert h_strong.grad[:2].abs().sum() > 0 and h_strong.grad[2:].abs().sum() == 0


def test_fixmatch_threshold_is_inclusive_and_empty_mask_is_zero():
    weak, strong = t([[0.0, 0.0], [LN3, 0.0]]), t([[1.0, 2.0], [2.0, 1.0]])
    losses, stats = fixmatch_losses(weak, weak, strong, strong, threshold=0.5, weight=1.0)
    assert stats == {"mask_h": 1.0, "mask_g": 1.0}  # max 0.5 >= 0.5 passes
    losses, stats = fixmatch_losses(weak, weak, strong, strong, threshold=0.999, weight=1.0)
    assert losses["fm_h"].item() == 0.0 and stats["mask_h"] == 0.0


def test_lr_factor_and_lambda_lr(cmkd_model):
    # (1 + 3e-4 t)^-0.75 at t = 0, 10k, 20k, 40k: 1, 4^-0.75, 7^-0.75, 13^-0.75
    assert [lr_factor(x) for x in (0, 10000, 20000, 40000)] == pytest.approx([1.0, 0.35355339, 0.23236808,
                                                                              0.14606376])
    optimizer, scheduler = cmkd_optimizer(cmkd_model, lr=3e-6, head_multiplier=1000)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-6, 3e-3])
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-6 * 1.0003 ** -0.75, 3e-3 * 1.0003 ** -0.75])


# --- model --------------------------------------------------------------------------------------------------------

def test_task_head_layout_and_init():
    torch.manual_seed(0)
    head = TaskHead(512, 65)
    bn, ln, fc = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and isinstance(ln, torch.nn.LayerNorm) and ln.eps == 1e-6
    assert fc.bias is None and fc.weight.shape == (65, 512)
    assert not bn.bias.requires_grad and bn.bias.abs().sum() == 0 and torch.all(bn.weight == 1)
    assert abs(fc.weight.std().item() - 0.001) < 5e-5 and abs(fc.weight.mean().item()) < 2e-5
    assert sum(p.numel() for p in head.parameters()) == 512 * 65 + 4 * 512


@pytest.fixture()
def cmkd_model(teacher):
    torch.manual_seed(0)
    return CmkdModel(copy.deepcopy(teacher.model), teacher.tokenizer, DIGITS, template=DIGITS_TEMPLATE)


def test_cmkd_model_heads_and_groups(cmkd_model, teacher):
    m = cmkd_model
    assert m.text_vectors.shape == (10, 64) and not m.text_vectors.requires_grad
    assert torch.allclose(m.text_vectors.norm(dim=-1), torch.ones(10))
    assert m.scale.item() == pytest.approx(teacher.logit_scale)
    images = torch.randn(4, 3, 32, 32)
    f = m.features(images)
    g = m.clip_logits(f)
    expected = teacher.logit_scale * (f / f.norm(dim=-1, keepdim=True)) @ m.text_vectors.t()
    assert torch.allclose(g, expected, atol=1e-5)
    assert m.head_logits(f).shape == (4, 10)
    groups = m.param_groups(3e-6, 1000)
    assert [g["lr"] for g in groups] == pytest.approx([3e-6, 3e-3])
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert id(m.head[0].bias) not in in_groups and len(groups[1]["params"]) == 4
    assert in_groups == {id(p) for p in m.trainable_parameters()}
    assert all(p.requires_grad and p.dtype == torch.float32 for p in m.visual.parameters())


def test_vit_b16_trainable_count_on_meta():
    import open_clip

    from pipeline.methods.param_counts import meta_model

    with torch.device("meta"):
        m = CmkdModel(meta_model("ViT-B-16"), open_clip.get_tokenizer("ViT-B-16"), ["class"] * 65,
                      template="an image of a {}")
    assert sum(p.numel() for p in m.visual.parameters()) == 86_192_640
    assert sum(p.numel() for p in m.head.parameters()) == 35_328  # 512*65 + 4*512, frozen BN bias included
    assert sum(p.numel() for p in m.trainable_parameters()) == 86_227_456  # ... minus the 512 frozen BN bias
    assert sum(p.numel() for g in m.param_groups(1.0, 1.0) for p in g["params"]) == 86_227_456


def test_resnet_batchnorm_stays_in_eval_mode():
    import open_clip

    from pipeline.methods.param_counts import meta_model

    with torch.device("meta"):
        m = CmkdModel(meta_model("RN50"), open_clip.get_tokenizer("RN50"), ["class"] * 3, template="a photo of a {}.")
    m.train()
    bns = [b for b in m.visual.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert bns and not any(b.training for b in bns)  # running statistics frozen ...
    assert all(b.weight.requires_grad and b.bias.requires_grad for b in bns)  # ... affine weights trained
    assert m.head.training and m.head[0].training


def test_head_batch_statistics_depend_on_the_batch():
    torch.manual_seed(0)
    head = TaskHead(8, 3).train()
    source, target = torch.randn(4, 8), torch.randn(4, 8) * 3 + 2
    per_domain = torch.cat([head(source), head(target)])
    assert not torch.allclose(per_domain, head(torch.cat([source, target])), atol=1e-4)


# --- one step -----------------------------------------------------------------------------------------------------

def batches(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return {"source_images": torch.randn(n, 3, 32, 32, generator=g),
            "source_labels": torch.randint(0, 10, (n,), generator=g),
            "target_weak": torch.randn(n, 3, 32, 32, generator=g)}


def cfg(fixmatch=False, **kw):
    return {**DEFAULT_CFG, "lambda_max_iter": 1, **kw,
            "fixmatch": {"enabled": fixmatch, "threshold": 0.0, "weight": 0.5}}


@pytest.mark.parametrize("fixmatch", [False, True])
def test_cmkd_step_runs_per_domain_heads_and_trains(cmkd_model, fixmatch):
    m = cmkd_model
    optimizer, scheduler = cmkd_optimizer(m, lr=1e-3, head_multiplier=10)
    before = {n: p.detach().clone() for n, p in m.visual.named_parameters()}
    sizes = []
    m.head.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    strong = torch.randn(4, 3, 32, 32) if fixmatch else None
    for step in range(2):  # lambda_max_iter = 1: lambda = 0 at t = 0, 0.462 at t = 1
        out = cmkd_step(m, optimizer, scheduler, **batches(step), target_strong=strong, t=step, cfg=cfg(fixmatch))
    n_domains = 3 if fixmatch else 2
    assert sizes == [4] * n_domains * 2 and m.head[0].num_batches_tracked.item() == n_domains * 2
    keys = {"cls", "task", "distill", "reg_ce", "reg_gini", "total", "alpha_mean", "lambda", "lr"}
    keys |= {"fm_h", "fm_g", "mask_h", "mask_g"} if fixmatch else set()
    assert set(out) == keys and all(math.isfinite(v) for v in out.values())
    assert out["lambda"] == pytest.approx(LAMBDA_MAX) and out["task"] > 0 and out["reg_gini"] > 0
    assert out["lr"] == pytest.approx(1e-3 * lr_factor(1)) and scheduler.last_epoch == 2
    terms = [out[k] for k in keys - {"total", "alpha_mean", "lambda", "lr", "mask_h", "mask_g"}]
    assert out["total"] == pytest.approx(sum(terms), rel=1e-5)
    if fixmatch:
        assert out["mask_h"] == 1.0 and out["fm_h"] > 0 and out["fm_g"] > 0
    assert any(not torch.equal(before[n], p) for n, p in m.visual.named_parameters())


def test_cmkd_step_with_rst_keeps_only_moves_beyond_tau(cmkd_model):
    plain, sparse = cmkd_model, copy.deepcopy(cmkd_model)
    base = frozen_copy(plain.visual)
    opt_a, sched_a = cmkd_optimizer(plain, lr=1e-3, head_multiplier=10)
    cmkd_step(plain, opt_a, sched_a, **batches(), t=0, cfg=cfg())
    moved = torch.cat([(p.detach() - base[n]).abs().reshape(-1) for n, p in plain.visual.named_parameters()])
    tau = moved[moved > 0].median().item()
    opt_b, sched_b = cmkd_optimizer(sparse, lr=1e-3, head_multiplier=10)
    cmkd_step(sparse, opt_b, sched_b, **batches(), t=0, cfg=cfg(), rst=RstProjection(base, tau))
    # same inputs and start: the RST model is exactly the plain step projected, entry by entry
    kept = 0
    for (n, a), b in zip(plain.visual.named_parameters(), sparse.visual.parameters()):
        assert torch.equal(b, torch.where((a - base[n]).abs() > tau, a, base[n])), n
        kept += int((b != base[n]).sum())
    assert 0 < kept < int((moved > 0).sum())
    assert all(torch.equal(a, b) for a, b in zip(plain.head.parameters(), sparse.head.parameters()))


def test_cmkd_step_refuses_bad_calls_and_nan(cmkd_model):
    m = cmkd_model
    optimizer, scheduler = cmkd_optimizer(m, lr=1e-3, head_multiplier=10)
    with pytest.raises(ValueError, match="lambda3"):
        cmkd_step(m, optimizer, scheduler, **batches(), t=0, cfg={k: v for k, v in cfg().items() if k != "lambda3"})
    with pytest.raises(ValueError, match="target_strong"):
        cmkd_step(m, optimizer, scheduler, **batches(), t=0, cfg=cfg(fixmatch=True))
    with pytest.raises(ValueError, match="share one iteration counter"):
        cmkd_step(m, optimizer, scheduler, **batches(), t=5, cfg=cfg())
    before = [p.detach().clone() for p in m.parameters()]
    bad = batches()
    bad["source_images"][0] = float("nan")
    with pytest.raises(TrainingDiverged):
        cmkd_step(m, optimizer, scheduler, **bad, t=0, cfg=cfg())
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # no step on a NaN loss


# --- RST and the sparse residual ----------------------------------------------------------------------------------

def test_project_strict_threshold_keeps_momentum():
    theta = torch.nn.Parameter(t([0.5, 0.25, 0.125, -0.5, 0.0]))
    base = {"w": torch.zeros(5)}
    optimizer = torch.optim.SGD([theta], lr=0.0, momentum=0.9)  # lr 0: the step only fills the momentum buffer
    theta.grad = t([1.0, 2.0, 3.0, 4.0, 5.0])
    optimizer.step()
    momentum = optimizer.state[theta]["momentum_buffer"].clone()
    storage = theta.data_ptr()
    project_({"w": theta}, base, 0.25)
    # |0.25 - 0| = tau is not > tau: reverted; 0.5 and -0.5 are kept
    assert theta.tolist() == [0.5, 0.0, 0.0, -0.5, 0.0]
    assert theta.data_ptr() == storage and optimizer.state[theta]["momentum_buffer"].equal(momentum)


def test_frozen_copy_is_detached_and_on_cpu(student):
    visual = copy.deepcopy(student.model.visual)
    base = frozen_copy(visual)
    name, p = next(iter(visual.named_parameters()))
    with torch.no_grad():
        p.add_(1.0)
    assert base.keys() == dict(visual.named_parameters()).keys()
    assert not base[name].requires_grad and base[name].device.type == "cpu" and not torch.equal(base[name], p)


def perturbed(visual, seed=0):
    """The visual state after a few sparse random changes, one of them 0.0 -> -0.0 (same value, other bits)."""
    g = torch.Generator().manual_seed(seed)
    state = {n: p.detach().clone() for n, p in visual.named_parameters()}
    for name in list(state)[::3]:
        flat = state[name].view(-1)
        index = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=g)
        flat[index] += torch.randn(index.numel(), generator=g) * 1e-3
    state["ln_post.bias"][0] = -0.0  # LayerNorm biases start at +0.0
    return state


def test_residual_round_trip_is_bit_identical(student, tmp_path):
    base = frozen_copy(student.model.visual)
    trained = perturbed(student.model.visual)
    head = TaskHead(64, 10)
    head(torch.randn(4, 64))  # running statistics and the int64 batch counter
    path = save_residual(tmp_path / "residual.safetensors", trained=trained, base=base, identity=student.identity,
                         extra=head.state_dict())
    restored, extra = load_residual(path, base=base, identity=student.identity)
    assert restored.keys() == base.keys()
    for name in base:
        assert torch.equal(restored[name].view(torch.int32), trained[name].view(torch.int32)), name
    assert restored["ln_post.bias"][0].item() == 0.0 and torch.signbit(restored["ln_post.bias"][0])
    assert extra.keys() == head.state_dict().keys()
    assert all(torch.equal(extra[k], v) for k, v in head.state_dict().items())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = [k for k in fh.keys() if k.startswith("residual.")]
        changed_names = {n for n in base if not torch.equal(base[n].view(torch.int32), trained[n].view(torch.int32))}
        assert {k.rsplit(".", 1)[0][len("residual."):] for k in keys} == changed_names
        assert all(fh.get_tensor(k).dtype == (torch.int32 if k.endswith(".index") else torch.float32) for k in keys)
    counts = dsp_counts(trained, base, head.state_dict(), n_classes=10, dim=64, path=path)
    head_bytes = sum(v.numel() * v.element_size() for v in head.state_dict().values())
    assert counts["bytes"] < 8 * counts["changed"] + head_bytes + 8192  # 8 bytes a changed weight + header


def test_residual_refuses_another_base(student, tmp_path):
    base = frozen_copy(student.model.visual)
    path = save_residual(tmp_path / "r.safetensors", trained=perturbed(student.model.visual), base=base,
                         identity=student.identity)
    with pytest.raises(ValueError, match="differing: pretrained") as err:
        load_residual(path, base=base, identity={**student.identity, "pretrained": "openai"})
    assert "'openai'" in str(err.value) and "'random'" in str(err.value)
    other = {n: v.clone() for n, v in base.items()}
    other["proj"][0, 0] += 1.0
    with pytest.raises(ValueError, match="same identity, different weights") as err:
        load_residual(path, base=other, identity=student.identity)
    assert visual_weights_hash(base)[:16] in str(err.value) and visual_weights_hash(other)[:16] in str(err.value)


def test_visual_weights_hash_is_stable():
    state = {"a": t([[1.0, 2.0]]), "b": t([3.0])}
    h = visual_weights_hash(state)
    assert h == visual_weights_hash({"b": state["b"].clone(), "a": state["a"].clone()})  # order and copies
    assert h != visual_weights_hash({"a": t([[1.0, 2.0]]), "b": t([3.5])})               # bytes
    assert h != visual_weights_hash({"a": t([1.0, 2.0]), "b": t([3.0])})                 # shape
    assert h != visual_weights_hash({"a": state["a"].double(), "b": state["b"]})          # dtype
    assert h != visual_weights_hash({"a2": state["a"], "b": state["b"]})                  # name


def test_dsp_counts_by_hand():
    base = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    trained = {"a": t([[0.0, 1e-3, 0.0], [0.0, 0.0, -2.0]]), "b": t([1.0, 1.0, 1.5, 1.0])}
    head = TaskHead(4, 3).state_dict()  # BN 4+4 (+ running stats, not counted), LN 4+4, Linear 4*3
    counts = dsp_counts(trained, base, head, n_classes=3, dim=4)
    assert counts == {"changed": 3, "head": 28, "dsp_code": 3 + 12 + 16, "dsp_paper": 3 + 12}
    with pytest.raises(ValueError, match="d\\*C"):
        dsp_counts(trained, base, head, n_classes=5, dim=4)
