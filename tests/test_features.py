"""Teacher features, class vectors, logits and the faiss index, and the key checks on reading the cache."""
import json

import numpy as np
import pytest
import torch

from pipeline.artifacts import Artifacts, StaleCacheError, keys_digest
from pipeline.features.cache import (build_index, encode_images, faiss_uses_gpu, load_index, logits,
                                     prompted_vectors, save_index, zero_shot_vectors)
from pipeline.models.factory import ModelSpec, load_model
from pipeline.models.teacher_prompts import PromptedTeacher

NAMES = ["zero", "one", "two", "three"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(ModelSpec(name="digits-vit-teacher", pretrained="random"))


def test_image_features_are_normalised_and_keyed(tiny, digits_shards):
    from pipeline.data.shards import read_manifest

    keys, feats = encode_images(tiny, digits_shards["mnist"], batch_size=16, device="cpu")
    assert keys == read_manifest(digits_shards["mnist"])["keys"] and feats.shape == (60, 64)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5) and feats.dtype == np.float32
    # workers interleave batches of their shards (3 here); the rows still come in manifest key order
    keys2, feats2 = encode_images(tiny, digits_shards["mnist"], batch_size=16, device="cpu", num_workers=2)
    assert keys2 == keys and np.allclose(feats2, feats, atol=1e-6)


def test_zero_shot_vectors_average_templates(tiny):
    one = zero_shot_vectors(tiny, NAMES, ["a photo of the number {}."], device="cpu")
    two = zero_shot_vectors(tiny, NAMES, ["a photo of the number {}.", "the number {}."], device="cpu")
    assert one.shape == (4, 64) and np.allclose(np.linalg.norm(two, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(one, two)


def _teacher(tiny, **kw):
    args = dict(template="a photo of the number {}.", n_ctx=2)
    return PromptedTeacher(tiny.model, tiny.tokenizer, NAMES, **{**args, **kw})


def test_prompted_vectors_one_set_per_saved_state(tiny):
    teacher = _teacher(tiny)
    first = teacher.trainable_state()
    second = {"ctx": first["ctx"] + 0.5}
    vecs = prompted_vectors(teacher, [first, second], precision="fp32", device="cpu")
    assert vecs.shape == (2, 4, 64)
    # the word-initialised context equals the plain prompt
    assert np.allclose(vecs[0], zero_shot_vectors(tiny, NAMES, ["a photo of the number {}."], device="cpu"),
                       atol=1e-5)
    assert not np.allclose(vecs[0], vecs[1])
    with pytest.raises(ValueError, match="missing \\['ctx'\\], unexpected \\['text.ctx'\\]"):
        prompted_vectors(teacher, [{"text.ctx": first["ctx"]}], precision="fp32", device="cpu")


def test_logits_are_scaled_cosines():
    f = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    w = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    assert np.allclose(logits(f, w, 100.0), [[100, 0], [60, 80]])


def test_faiss_index_roundtrip_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 16)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    index, meta = build_index(feats, device="cpu")
    assert meta == {**meta, "index_type": "IndexFlatIP", "dim": 16, "ntotal": 50, "built_on": "cpu"}
    save_index(index, tmp_path / "i.faiss")
    scores, ids = load_index(tmp_path / "i.faiss").search(feats[:5], 3)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert not faiss_uses_gpu("cpu") and not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ValueError, match="faiss_index 'ivf'"):
        build_index(feats, index_type="ivf")


def test_prompted_vectors_accept_class_specific_contexts(tiny):
    teacher = _teacher(tiny, class_specific=True)
    assert teacher.ctx.shape == (4, 2, 64)
    vecs = prompted_vectors(teacher, [teacher.trainable_state()], precision="fp32", device="cpu")
    assert np.allclose(vecs[0], zero_shot_vectors(tiny, NAMES, ["a photo of the number {}."], device="cpu"),
                       atol=1e-5)


# ----------------------------------------------------------------------------------------- cache key checks
KEYS = {"source": ["s0", "s1"], "target": ["t0", "t1", "t2"]}


@pytest.fixture
def cached(tmp_path):
    """A project with shard manifests for domains a (source) and b (target) and a features cache of both."""
    artifacts = Artifacts({"shards": str(tmp_path / "shards"), "features": str(tmp_path / "features")})
    for side, domain in (("source", "a"), ("target", "b")):
        artifacts.shards("toy", domain).mkdir(parents=True)
        (artifacts.shards("toy", domain) / "manifest.json").write_text(json.dumps({"keys": KEYS[side]}))
        out = artifacts.features.domain("toy", domain)
        out.dir.mkdir(parents=True)
        np.save(out.features_path, np.ones((len(KEYS[side]), 4), np.float32))
        out.keys_path.write_text(json.dumps(KEYS[side]))
    task = artifacts.features.task("a_to_b")
    task.dir.mkdir(parents=True)
    np.save(task.target_logits, np.zeros((3, 2), np.float32))
    task.meta_path.write_text(json.dumps({"classes": ["x", "y"], "logit_scale": 1.0,
                                          "keys": {side: keys_digest(k) for side, k in KEYS.items()}}))
    return artifacts


def _job(artifacts):
    from pipeline.methods.base import TaskJob

    return TaskJob(name="a_to_b", task={"dataset": "toy", "source": "a", "target": "b"}, params={}, models={},
                   device="cpu", artifacts=artifacts)


def test_domain_features_are_checked_against_the_shard_keys(cached):
    out = cached.features.domain("toy", "b")
    assert out.features(["t0", "t1", "t2"]).shape == (3, 4)
    with pytest.raises(StaleCacheError) as err:
        out.features(["t0", "t2", "t1"])  # the domain was re-sharded in another order
    assert str(out.keys_path) in str(err.value)
    assert "row 1 is 't1', the shards have 't2' there" in str(err.value)
    assert "dvc repro -f -s features" in str(err.value)
    with pytest.raises(StaleCacheError, match=r"keys.json was computed for 3 samples, the shards hold 4"):
        out.keys(["t0", "t1", "t2", "t3"])
    np.save(out.features_path, np.ones((2, 4), np.float32))
    with pytest.raises(StaleCacheError, match=r"features.npy has 2 rows, .*keys.json lists 3 keys"):
        out.features(["t0", "t1", "t2"])


def test_task_cache_rows_are_checked_against_the_shard_keys(cached):
    job = _job(cached)
    assert job.cached_rows(job.cached.target_logits, "target").shape == (3, 2)
    assert job.domain_features("source").shape == (2, 4) and job.classes == ["x", "y"]
    manifest = cached.shards("toy", "b") / "manifest.json"
    manifest.write_text(json.dumps({"keys": ["t0", "t1"]}))  # re-sharded: one image fewer
    job = _job(cached)
    with pytest.raises(StaleCacheError) as err:
        job.cached_rows(job.cached.target_logits, "target")
    message = str(err.value)
    assert str(job.cached.meta_path) in message and "the target rows" in message
    assert "the 2 the shards hold now (3 samples)" in message and "dvc repro -f -s features" in message


def test_task_cache_without_recorded_keys_is_refused(cached):
    meta = cached.features.task("a_to_b").meta_path
    meta.write_text(json.dumps({"classes": ["x", "y"]}))
    with pytest.raises(StaleCacheError, match="no keys recorded: an older cache.*dvc repro -f -s features"):
        _ = _job(cached).meta
