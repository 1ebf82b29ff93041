"""EKDA, DAPL, source-prompt variants (VPT, SCL, GPA), the collapse guard and kNN refinement on tiny digits."""
import math

import numpy as np
import pytest
import torch
from conftest import copy_without_labels

from pipeline.data.classlists import load_classlist, prompt_name
from pipeline.data.shards import read_labels
from pipeline.features.cache import encode_images, logits, zero_shot_vectors
from pipeline.losses import LOSS_DEFAULTS, build_distill_loss
from pipeline.methods.training import EpochRecorder, TrainingCollapsed
from pipeline.methods.dapl import masked_pseudo_label_ce, naive_probabilities, train_dapl
from pipeline.methods.ekda import train_ekda
from pipeline.methods.shared import KeyedRows
from pipeline.methods.refine import KnnRefiner
from pipeline.methods.source_prompts import (aggregate_states, gaussian_weights, teacher_step_loss,
                                             train_source_prompts)

NAMES = [prompt_name(c) for c in load_classlist("digits")]
TEMPLATE = "a photo of the number {}."
EKDA = dict(template=TEMPLATE, n_ctx=2, init="random", visual_tokens=2, teacher_lr=0.01, text_weight=25.0,
            image_weight=10.0, kl_weight=1.0, ce_weight=1.0, align_weight=1.0)
DAPL = dict(n_ctx=2, n_domain_ctx=2, class_specific=False, naive_template=TEMPLATE, threshold=0.0,
            temperature=1.0, target_weight=1.0)


@pytest.fixture(scope="module")
def cached(teacher, digits_shards):
    out = {d: encode_images(teacher, digits_shards[d], batch_size=32, device="cpu") for d in ("usps", "mnist")}
    out["zs"] = zero_shot_vectors(teacher, NAMES, [TEMPLATE], device="cpu")
    return out


def _ekda(teacher, student, shards, target_dir, cached, tmp_path, **kw):
    keys, feats = cached["usps"]
    args = dict(teacher_model=teacher, student_model=student, classnames=NAMES, source_dir=shards["usps"],
                target_dir=target_dir, zs_text=cached["zs"], source_zs_features=KeyedRows(keys, feats),
                ekda=EKDA, loss=build_distill_loss(LOSS_DEFAULTS, n_classes=10, feature_dim=64), epochs=2,
                batch_size=16, lr=0.05, momentum=0.9, weight_decay=0.0, n_tokens=2, location="middle", depth=2,
                seed=0, device="cpu", checkpoint_path=tmp_path / "ekda.pt")
    return train_ekda(**{**args, **kw})


def test_ekda_trains_teacher_and_student_without_target_labels(teacher, student, digits_shards, cached, tmp_path):
    target = copy_without_labels(digits_shards["mnist"], tmp_path / "mnist")
    before = {k: p.detach().clone() for k, p in teacher.model.named_parameters()}
    out = _ekda(teacher, student, digits_shards, target, cached, tmp_path)
    assert out.predictions.shape == (2, 60) and out.keys == cached["mnist"][0]
    # teacher: text ctx 2x64 + visual 2x64; student: prompts 2 layers x 2 x 32 + projector 32 -> 64
    assert out.log_extra["loss"] == "kl" and out.log_extra["trainable_by_part"] == {"teacher": 2 * 64 + 2 * 64,
                                        "student": 2 * 2 * 32 + (32 * 64 + 64) + 2 * 64 + (64 * 64 + 64)}
    assert out.log[0]["iterations"] == 4  # epoch = number of source batches (60 / 16)
    assert out.class_vectors.shape == (10, 64)
    assert not np.allclose(out.class_vectors, cached["zs"], atol=1e-3)  # the teacher kept adapting
    assert all(torch.equal(p, before[k]) for k, p in teacher.model.named_parameters())  # CLIP frozen
    saved = torch.load(tmp_path / "ekda.pt", weights_only=True)
    assert saved["epoch"] == 2 and set(saved["state"]) == {"teacher", "student", "loss"}
    # a fresh snapshot path: the same one would resume the finished run instead of training again
    again = _ekda(teacher, student, digits_shards, target, cached, tmp_path, checkpoint_path=tmp_path / "again.pt")
    assert np.array_equal(out.predictions, again.predictions)  # seeded: repeatable on CPU


def test_ekda_with_knn_refined_pseudo_labels_and_nd_loss(teacher, student, digits_shards, cached, tmp_path):
    keys, feats = cached["mnist"]
    refiner = KnnRefiner(keys, feats, np.full((60, 10), 0.1, dtype=np.float32), k=5)
    nd = build_distill_loss({**LOSS_DEFAULTS, "name": "nd"}, n_classes=10, feature_dim=64)
    out = _ekda(teacher, student, digits_shards, digits_shards["mnist"], cached, tmp_path, refiner=refiner,
                loss=nd, epochs=1)
    assert out.predictions.shape == (1, 60) and math.isfinite(out.log[0]["student_loss"])
    assert not np.allclose(refiner.bank.numpy(), 0.1)  # fresh teacher probabilities entered the bank


def _dapl(teacher, digits_shards, cached, **kw):
    s_keys, s_feats = cached["usps"]
    shard_keys, labels = read_labels(digits_shards["usps"])
    by_key = dict(zip(shard_keys, labels.tolist()))
    t_keys, t_feats = cached["mnist"]
    args = dict(model=teacher, classnames=NAMES, domains=("usps", "mnist"), source_features=s_feats,
                source_labels=np.array([by_key[k] for k in s_keys]), target_keys=t_keys, target_features=t_feats,
                naive_probs=naive_probabilities(t_feats, cached["zs"], scale=teacher.logit_scale, temperature=1.0),
                dapl=DAPL, epochs=3, batch_size=16, lr=0.5, momentum=0.9, weight_decay=0.0, seed=0, device="cpu")
    return train_dapl(**{**args, **kw})


def test_dapl_learns_domain_prompts(teacher, digits_shards, cached):
    out = _dapl(teacher, digits_shards, cached)
    assert out.predictions.shape == (3, 60) and out.trainable_params == 2 * 64 + 2 * 2 * 64
    assert out.log[-1]["source_ce"] < out.log[0]["source_ce"]
    assert out.log[0]["pseudo_labels_kept"] == 1.0  # threshold 0 keeps every target sample
    assert set(out.state["prompts"]) == {"ctx", "domain_ctx"}
    strict = _dapl(teacher, digits_shards, cached, dapl={**DAPL, "threshold": 1.01}, epochs=1)
    assert strict.log[0]["pseudo_labels_kept"] == 0.0 and math.isfinite(strict.log[0]["loss"])


def test_masked_pseudo_label_ce_by_hand():
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    p = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]])
    value, kept = masked_pseudo_label_ce(z, p, threshold=0.65)  # rows 0 (label 0) and 2 (label 1) pass
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(0.5)) / 2
    assert kept == 2 and value.item() == pytest.approx(expected, rel=1e-6)
    empty, none_kept = masked_pseudo_label_ce(z, p, threshold=0.95)
    empty.backward()
    assert none_kept == 0 and empty.item() == 0.0 and torch.all(z.grad == 0)  # no NaN (DAPL's quirk)


def test_source_visual_prompts_with_scl_and_gpa(teacher, digits_shards, cached):
    architecture = dict(template=TEMPLATE, n_ctx=0, visual_tokens=2, visual_location="middle")
    config = dict(text_weight=25.0, image_weight=10.0, kl_weight=1.0, gpa_mean=2.0, gpa_std=1.0)
    out = train_source_prompts(teacher_model=teacher, classnames=NAMES, shard_dir=digits_shards["usps"],
                               architecture=architecture, config=config, zs_text=torch.from_numpy(cached["zs"]), epochs=3, batch_size=16,
                               lr=0.1, momentum=0.9, weight_decay=0.0, seed=0, device="cpu")
    assert out["trainable_params"] == 2 * 64 and out["gpa"]
    w = gaussian_weights(3, 2.0, 1.0)
    expected = sum(wi * s["visual_prompts"] for wi, s in zip(w, out["states"]))
    assert torch.allclose(out["reported"]["visual_prompts"], expected, atol=1e-6)


def test_gaussian_weights_and_aggregation_by_hand():
    w = gaussian_weights(3, 2.0, 1.0)
    e = math.exp(-0.5)
    assert w == pytest.approx([e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)])
    states = [{"p": torch.tensor([0.0]), "n": torch.tensor(1)}, {"p": torch.tensor([3.0]), "n": torch.tensor(2)}]
    agg = aggregate_states(states, [0.25, 0.75])
    assert agg["p"].item() == pytest.approx(2.25) and agg["n"].item() == 2  # integers: the last state's
    with pytest.raises(ValueError, match="gpa_mean=100"):
        gaussian_weights(3, 100.0, 0.01)


def test_teacher_step_loss_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zs_text = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    image = torch.tensor([[1.0, 0.0]])
    zs_image = torch.tensor([[0.6, 0.8]])
    z = 10.0 * image @ text.t()  # [10, 0]
    y = torch.tensor([0])
    loss, parts = teacher_step_loss(z, y, text=text, image=image, zs_text=zs_text, zs_image=zs_image, scale=10.0,
                                    text_weight=2.0, image_weight=3.0, kl_weight=4.0)
    ce = math.log(1 + math.exp(-10))
    l1_text = (0.2 + 0.6 + 0 + 0) / 4
    l1_image = (0.4 + 0.8) / 2
    z0 = [10 * (0.6 * 0.8 + 0.8 * 0.6), 10 * 0.8]  # zero-shot logits [9.6, 8]
    p0 = [math.exp(v) / sum(math.exp(u) for u in z0) for v in z0]
    p = [1 / (1 + math.exp(-10)), math.exp(-10) / (1 + math.exp(-10))]
    kl_numel = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p0, p)) / 2  # / (B*C) = / 2
    assert parts["l1_text"] == pytest.approx(l1_text) and parts["l1_image"] == pytest.approx(l1_image)
    assert loss.item() == pytest.approx(ce + 2 * l1_text + 3 * l1_image + 4 * kl_numel, rel=1e-5)
    with pytest.raises(ValueError, match="needs the zero-shot"):
        teacher_step_loss(z, y, text=text, image=image, zs_text=None, zs_image=None, scale=10.0, text_weight=1.0,
                          image_weight=0.0, kl_weight=0.0)


def test_collapse_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = tmp_path / "last_good.pt"
    rec = EpochRecorder(n_classes=3, collapse_fraction=0.8, checkpoint_path=ckpt, where="distill task t")
    rec.add(1, ["a", "b", "c", "d", "e"], np.array([0, 1, 2, 0, 1]), {"epoch": 1}, state={"w": torch.ones(1)})
    with pytest.raises(TrainingCollapsed, match=r"epoch 2 predicts class 2 for 100.0% .*collapse_fraction=0.8.*"
                                                r"epoch 1\) is kept at .*last_good.pt"):
        rec.add(2, ["a", "b", "c", "d", "e"], np.array([2, 2, 2, 2, 2]), {"epoch": 2}, state={"w": torch.zeros(1)})
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1 and torch.equal(saved["state"]["w"], torch.ones(1))
    assert rec.result()["predictions"].shape == (1, 5) and rec.log[0]["top_class_fraction"] == 0.4


def test_knn_refinement_outvotes_a_lone_wrong_label():
    feats = np.array([[1, 0], [0.99, 0.14], [0.98, 0.2], [0, 1], [0.14, 0.99], [0.2, 0.98]], dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.1, 0.9], [0.1, 0.9], [0.3, 0.7]], dtype=np.float32)
    refiner = KnnRefiner([f"k{i}" for i in range(6)], feats, probs, k=3)
    refined = refiner.refine_all()
    assert refined.argmax(1).tolist() == [0, 0, 0, 1, 1, 1]  # sample 1 out-voted by its cluster
    assert refined[1] == pytest.approx(probs[:3].mean(0))
    fresh = refiner(["k1"], torch.tensor([[1.0, 0.0]]))  # an updated teacher probability enters the vote
    assert fresh[0].tolist() == pytest.approx([(0.9 + 1.0 + 0.8) / 3, (0.1 + 0.0 + 0.2) / 3])
    with pytest.raises(KeyError, match="no cached teacher feature for target sample 'zz'"):
        refiner(["zz"])


def test_dapl_refined_logits_helper_is_a_softmax(cached, teacher):
    _, feats = cached["mnist"]
    p = naive_probabilities(feats, cached["zs"], scale=teacher.logit_scale, temperature=2.0)
    z = logits(feats, cached["zs"], teacher.logit_scale) / 2.0
    ref = np.exp(z - z.max(1, keepdims=True))
    assert np.allclose(p, ref / ref.sum(1, keepdims=True), atol=1e-6)


def test_every_method_trains_on_seeded_train_views(teacher, student, digits_shards, cached, tmp_path):
    """augment: dassl (random resized crop + flip) for EKDA, DAPL and CoOp: repeatable, and not the eval view."""
    target = copy_without_labels(digits_shards["mnist"], tmp_path / "mnist")  # augmentation must not read labels
    runs = {}
    for augment in ("dassl", "dassl", "none"):
        ekda = _ekda(teacher, student, digits_shards, target, cached, tmp_path, epochs=1, augment=augment,
                     checkpoint_path=None)  # no snapshot: each run trains
        dapl = _dapl(teacher, digits_shards, cached, epochs=1, augmented=None if augment == "none" else {
            "source_dir": digits_shards["usps"], "target_dir": target, "augment": augment, "num_workers": 0})
        runs.setdefault(augment, []).append((ekda, dapl))
    (e1, d1), (e2, d2) = runs["dassl"]
    (e0, d0), = runs["none"]
    assert np.array_equal(e1.predictions, e2.predictions) and np.array_equal(d1.predictions, d2.predictions)
    assert torch.equal(e1.state["student"]["encoder.prompts"], e2.state["student"]["encoder.prompts"])
    assert not torch.equal(e1.state["student"]["encoder.prompts"], e0.state["student"]["encoder.prompts"])
    assert not torch.equal(d1.state["prompts"]["ctx"], d0.state["prompts"]["ctx"])
    assert d1.log[0]["iterations"] == d0.log[0]["iterations"] == 4  # an epoch is one pass over the source
    config = dict(text_weight=0.0, image_weight=0.0, kl_weight=0.0, gpa_mean=0.0, gpa_std=1.0)
    coop = [train_source_prompts(teacher_model=teacher, classnames=NAMES, shard_dir=digits_shards["usps"],
                                 architecture=dict(template=TEMPLATE, n_ctx=2), config={**config, "augment": a}, zs_text=None, epochs=1, batch_size=16, lr=0.5,
                                 momentum=0.9, weight_decay=0.0, seed=0, device="cpu") for a in ("dassl", "none")]
    assert not torch.equal(coop[0]["reported"]["ctx"], coop[1]["reported"]["ctx"])
