"""Teacher features, class vectors, logits and the faiss index."""
import numpy as np
import pytest
import torch

from pipeline.features.cache import (build_index, encode_images, faiss_uses_gpu, load_index, logits,
                                     prompted_vectors, save_index, zero_shot_vectors)
from pipeline.models.factory import ModelSpec, load_model
from pipeline.models.prompted import PromptedTeacher

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
    second = {"text.ctx": first["text.ctx"] + 0.5}
    vecs = prompted_vectors(teacher, [first, second], precision="fp32", device="cpu")
    assert vecs.shape == (2, 4, 64)
    # the word-initialised context equals the plain prompt
    assert np.allclose(vecs[0], zero_shot_vectors(tiny, NAMES, ["a photo of the number {}."], device="cpu"),
                       atol=1e-5)
    assert not np.allclose(vecs[0], vecs[1])
    with pytest.raises(ValueError, match="missing \\['text.ctx'\\], unexpected \\['ctx'\\]"):
        prompted_vectors(teacher, [{"ctx": first["text.ctx"]}], precision="fp32", device="cpu")


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
    assert teacher.text.ctx.shape == (4, 2, 64)
    vecs = prompted_vectors(teacher, [teacher.trainable_state()], precision="fp32", device="cpu")
    assert np.allclose(vecs[0], zero_shot_vectors(tiny, NAMES, ["a photo of the number {}."], device="cpu"),
                       atol=1e-5)
