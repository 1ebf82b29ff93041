"""PDA (Bai et al., AAAI 2024): feature banks, the IFT, the pseudo-label switch, a short run and its bundle model."""
import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.artifacts import Artifacts, keys_digest
from pipeline.data.classlists import load_classlist
from pipeline.data.shards import shard_keys
from pipeline.features.cache import encode_images, encode_shards, zero_shot_vectors
from pipeline.io import atomic_write_json
from pipeline.methods import METHODS
from pipeline.methods.base import TaskJob
from pipeline.methods.pda import Ift, build_bank, masked_ce, pseudo_labels


def _onehot_probs(classes, confidence, n_classes=3):
    """Probabilities whose arg-max is ``classes[i]`` with probability ``confidence[i]``."""
    probs = np.zeros((len(classes), n_classes), np.float32)
    for i, (c, p) in enumerate(zip(classes, confidence)):
        probs[i] = (1 - p) / (n_classes - 1)
        probs[i, c] = p
    return probs


def test_source_bank_keeps_the_k_most_confident_correct_images_per_class():
    feats = np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)  # row i is [i, i]
    predicted = [0, 0, 0, 1, 1, 2]
    probs = _onehot_probs(predicted, [0.5, 0.9, 0.7, 0.6, 0.95, 0.8])
    labels = np.array([0, 0, 0, 1, 2, 2])  # row 4 is predicted 1 but is a 2: never enters a source bank
    slots, confidence = build_bank(feats, probs, labels, size=2, stop=0.99, batch_size=2)
    assert slots.shape == (3, 2, 2) and confidence.shape == (3, 2)
    assert sorted(slots[0, :, 0].tolist()) == [1.0, 2.0]  # 0.9 and 0.7 beat 0.5
    assert sorted(confidence[0].tolist()) == pytest.approx([0.7, 0.9])
    assert sorted(slots[1, :, 0].tolist()) == [0.0, 3.0]  # one correct image; the other slot stays empty (zero)
    assert sorted(slots[2, :, 0].tolist()) == [0.0, 5.0]
    # the target bank has no labels: the pseudo-label decides
    slots, confidence = build_bank(feats, probs, None, size=2, stop=0.99, batch_size=2)
    assert sorted(slots[1, :, 0].tolist()) == [3.0, 4.0]


def test_bank_construction_stops_once_every_slot_is_confident():
    feats = np.eye(4, dtype=np.float32)
    probs = _onehot_probs([0, 1, 0, 1], [0.995, 0.996, 0.5, 0.5], n_classes=2)
    slots, confidence = build_bank(feats, probs, None, size=1, stop=0.99, batch_size=2)
    assert confidence[:, 0].tolist() == pytest.approx([0.995, 0.996])
    # rows 2, 3 are never seen: they could not have displaced anything, but the walk stopped after batch 1
    slots, _ = build_bank(feats, _onehot_probs([0, 1, 0, 1], [0.995, 0.996, 0.999, 0.999], n_classes=2), None,
                          size=1, stop=0.99, batch_size=2)
    assert slots[0].tolist() == [[1, 0, 0, 0]] and slots[1].tolist() == [[0, 1, 0, 0]]
    slots, _ = build_bank(feats, _onehot_probs([0, 1, 0, 1], [0.995, 0.996, 0.999, 0.999], n_classes=2), None,
                          size=1, stop=0.999, batch_size=2)  # not yet confident enough: batch 2 is read
    assert slots[0].tolist() == [[0, 0, 1, 0]]


def test_ift_shapes_and_parameter_count():
    ift = Ift(512, beta=0.1)
    assert sum(p.numel() for p in ift.parameters()) == 399_744  # 512->64->64->1536 with BN, post 512->512
    tiny = Ift(16, beta=0.1).eval()
    text, feats = F.normalize(torch.randn(5, 16), dim=-1), F.normalize(torch.randn(3, 16), dim=-1)
    banks = F.normalize(torch.randn(5, 16), dim=-1), F.normalize(torch.randn(5, 16), dim=-1)
    logits_c = tiny(text, feats, *banks, scale=20.0)
    assert logits_c.shape == (3, 5)
    assert logits_c.abs().max() <= 0.1 * 20.0 * 2 + 1e-4  # beta * scale * (two unit vectors) . (unit vector)
    q, k, v = tiny._qkv(feats)  # interleaved split of the 3D output, as the original's rearrange
    out = tiny.pre(feats)
    assert torch.equal(q, out[:, 0::3]) and torch.equal(k, out[:, 1::3]) and torch.equal(v, out[:, 2::3])


def test_pseudo_labels_switch_from_zero_shot_to_own_after_the_switch_epoch():
    zero_shot = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    own = torch.tensor([[-5.0, 5.0], [5.0, -5.0]])  # the model disagrees with zero-shot
    for epoch in (0, 1, 2):  # 0-based epochs up to and including EPOCH = 2: zero-shot
        assert pseudo_labels(zero_shot, own, epoch=epoch, switch_epoch=2)[1].tolist() == [0, 1]
    confidence, labels = pseudo_labels(zero_shot, own, epoch=3, switch_epoch=2)
    assert labels.tolist() == [1, 0] and confidence.min() > 0.99
    assert pseudo_labels(zero_shot, own, epoch=0, switch_epoch=0)[1].tolist() == [0, 1]  # Office-31: EPOCH = 0
    assert pseudo_labels(zero_shot, own, epoch=1, switch_epoch=0)[1].tolist() == [1, 0]


def test_masked_ce_averages_over_kept_rows_only():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    labels = torch.tensor([0, 0, 1])
    mask = torch.tensor([True, True, False])
    expected = F.cross_entropy(logits[:2], labels[:2])
    assert torch.allclose(masked_ce(logits, labels, mask), expected)


def _pda_job(teacher, digits_shards, tmp_path, block):
    """A distill TaskJob for PDA on usps -> mnist with the features stage's domain features and meta.json."""
    artifacts = Artifacts({"shards": str(tmp_path / "shards"), "features": str(tmp_path / "features")})
    keys = {}
    for side, domain in (("source", "usps"), ("target", "mnist")):
        artifacts.shards("digits", domain).parent.mkdir(parents=True, exist_ok=True)
        artifacts.shards("digits", domain).symlink_to(digits_shards[domain])
        out = artifacts.features.domain("digits", domain)
        out.dir.mkdir(parents=True)
        keys[side], feats = encode_images(teacher, digits_shards[domain], batch_size=32, device="cpu")
        assert keys[side] == shard_keys(digits_shards[domain])
        np.save(out.features_path, feats)
        atomic_write_json(out.keys_path, keys[side])
    atomic_write_json(artifacts.features.task("t").meta_path,
                      {"classes": load_classlist("digits"), "logit_scale": teacher.logit_scale,
                       "keys": {side: keys_digest(k) for side, k in keys.items()}})
    params = {"seed": 0, "runtime": {"deterministic": True, "num_workers": 0}, "evaluate": {"batch_size": 32},
              "distill": {"method": "pda", "collapse_fraction": 1.0, "momentum": 0.9, "weight_decay": 0.0,
                          "pda": block}}
    return TaskJob(name="t", task={"dataset": "digits", "source": "usps", "target": "mnist"}, params=params,
                   models={"teacher": teacher}, device="cpu", artifacts=artifacts)


@pytest.fixture(scope="module")
def pda_run(teacher, digits_shards, tmp_path_factory):
    block = copy.deepcopy(METHODS["pda"].params.defaults())
    # 60 source images, batch 16: 4 steps per epoch; the switch to self-training after the 0-based epoch 1
    block.update(template="a photo of the number {}.", coupled_depth=1, threshold=0.0, switch_epoch=1, lr=0.05,
                 epochs=3, batch_size=16, augment="none", bank_size=2)
    job = _pda_job(teacher, digits_shards, tmp_path_factory.mktemp("pda"), block)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    result = METHODS["pda"].run(job)
    return job, result, before


def test_pda_trains_prompts_and_ift_and_leaves_clip_frozen(pda_run, teacher):
    job, result, before = pda_run
    assert result.predictions.shape == (3, 60) and set(result.extra_predictions) == {"base_branch"}
    assert result.extra_predictions["base_branch"].shape == (3, 60)
    assert [e["epoch"] for e in result.log] == [1, 2, 3]
    assert all(e["pseudo_labels_kept"] == 1.0 for e in result.log)  # threshold 0: every target row trains
    assert all(np.isfinite(e["loss"]) and e["target_ce"] > 0 for e in result.log)
    banks = result.log_extra["banks"]
    assert banks["source"]["slots"] == banks["target"]["slots"] == 20  # 10 classes x K = 2
    feats = job.domain_features("target")  # every target image predicted c can fill one of class c's K slots
    zs = zero_shot_vectors(teacher, job.classnames, ["a photo of the number {}."], device="cpu")
    per_class = np.bincount((feats @ zs.T).argmax(1), minlength=10)
    assert banks["target"]["filled"] == np.minimum(per_class, 2).sum() and banks["source"]["filled"] <= 20
    dim = job.domain_features("target").shape[1]
    assert result.state["source_bank"].shape == result.state["target_bank"].shape == (10, dim)
    assert result.state["visual_prompts"].shape[:2] == (2, 2)  # every layer (2 in the stand-in), n_ctx tokens
    assert result.class_vectors.shape == (10, dim)
    after = teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the CLIP is frozen


def test_pda_bundle_model_reproduces_the_last_predictions(pda_run, teacher, digits_shards):
    job, result, _ = pda_run
    state = {**result.state, "class_vectors": torch.from_numpy(result.class_vectors)}
    config = {"logit_scale": job.logit_scale, "base": {"precision": teacher.spec.precision},
              "method_config": result.checkpoint}
    model = METHODS["pda"].classifier(state, config, teacher)
    keys, _ = encode_images(teacher, digits_shards["mnist"], batch_size=32, device="cpu")  # the key order
    with torch.no_grad():
        found_keys, logits, _ = encode_shards(model, digits_shards["mnist"], transform=teacher.preprocess,
                                              batch_size=32, device="cpu", precision=teacher.spec.precision)
    assert found_keys == result.keys == keys
    np.testing.assert_array_equal(logits.argmax(1).numpy(), result.predictions[-1])


def test_pda_bundle_model_exports_with_a_dynamic_batch(pda_run, teacher):
    from pipeline.student.export import _batch_dim

    job, result, _ = pda_run
    state = {**result.state, "class_vectors": torch.from_numpy(result.class_vectors)}
    config = {"logit_scale": job.logit_scale, "base": {"precision": "fp32"}, "method_config": result.checkpoint}
    model = METHODS["pda"].classifier(state, config, teacher)
    program = torch.export.export(model, (torch.randn(4, 3, 32, 32),), dynamic_shapes=({0: _batch_dim()},))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)
