"""Reduced-scale JPEG decoding (``decode_size``), ``num_workers: auto`` and the CUDA loader options."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fixture_trees as ft
import pipeline  # noqa: F401  (torchvision guard first)
import torch
from pipeline.data import shards
from pipeline.data.shards import image_loader, open_rgb, resolve_num_workers, write_domain_shards
from pipeline.data.transforms import eval_transform

# open_clip's ViT-B/16 (OpenAI) eval preprocess: shorter side to 224, bicubic, centre crop
CFG = {"size": 224, "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
       "interpolation": "bicubic", "resize_mode": "shortest"}
# Measured on the photo-like JPEGs below: mean |full - draft| 0.005-0.009, max 0.03-0.07 (normalised units).
MEAN_TOLERANCE, MAX_TOLERANCE = 0.015, 0.2
SIZES = [(900, 600), (1200, 1600), (640, 480), (1500, 1000), (460, 800), (2000, 1400)]


def test_draft_decodes_large_jpegs_at_a_reduced_scale_never_below_the_need():
    rng = np.random.default_rng(0)
    big = ft.photo_bytes(rng, 1000, 700)
    assert open_rgb(big).size == (1000, 700)
    assert open_rgb(big, 224).size == (500, 350)  # 1/2: 1/4 would give a 175-px shorter side
    assert open_rgb(big, 80).size == (125, 88)  # 1/8, still >= 80 a side
    small = ft.photo_bytes(rng, 400, 300)  # under twice 224: decoded in full
    assert open_rgb(small, 224).size == (400, 300)
    png = ft.photo_bytes(rng, 1000, 700, "PNG")  # not a JPEG: no reduced decode exists
    assert open_rgb(png, 224).size == (1000, 700)
    assert open_rgb(big, 224).mode == open_rgb(png, 224).mode == "RGB"


def test_draft_eval_tensors_match_a_full_decode_within_tolerance():
    transform = eval_transform(CFG)
    rng = np.random.default_rng(0)
    for w, h in SIZES:
        data = ft.photo_bytes(rng, w, h)
        full, draft = transform(open_rgb(data)), transform(open_rgb(data, 224))
        assert full.shape == draft.shape == (3, 224, 224)
        diff = (full - draft).abs()
        assert diff.mean() < MEAN_TOLERANCE and diff.max() < MAX_TOLERANCE, ((w, h), diff.mean(), diff.max())


def _photo_tree(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for cls, n in (("apple", 3), ("mango", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            w, h = SIZES[(i + len(cls)) % len(SIZES)]
            (root / cls / f"img_{i}.jpg").write_bytes(ft.photo_bytes(rng, w // 2, h // 2))
    return root


def _by_key(loader) -> dict[str, torch.Tensor]:
    return {k: x for keys, images, _ in loader for k, x in zip(keys, images)}


def test_draft_decoding_same_tensors_for_any_worker_count(tmp_path):
    write_domain_shards(_photo_tree(tmp_path / "tree"), tmp_path / "out", dataset="t", domain="d",
                        classes=["apple", "mango"], maxcount=2, seed=0)
    transform = eval_transform({**CFG, "size": 64})
    kw = dict(transform=transform, batch_size=2, shuffle=False, with_labels=True, decode_size=64)
    zero = _by_key(image_loader(tmp_path / "out", num_workers=0, **kw))
    two = _by_key(image_loader(tmp_path / "out", num_workers=2, **kw))
    full = _by_key(image_loader(tmp_path / "out", num_workers=0, **{**kw, "decode_size": None}))
    assert zero.keys() == two.keys() == full.keys() and len(zero) == 6
    assert all(torch.equal(zero[k], two[k]) for k in zero)
    assert any(not torch.equal(zero[k], full[k]) for k in zero)  # the reduced decode was used


@pytest.mark.parametrize("cores,expected", [(1, 0), (2, 0), (3, 2), (4, 3), (9, 8), (64, 8), (None, 0)])
def test_auto_workers(monkeypatch, cores, expected):
    monkeypatch.setattr(shards.os, "cpu_count", lambda: cores)
    assert resolve_num_workers("auto") == expected
    assert resolve_num_workers(3) == 3 and resolve_num_workers(0) == 0


@pytest.mark.parametrize("bad", [-1, "four", 1.5, True])
def test_bad_worker_counts_are_refused(bad):
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0 or 'auto'"):
        resolve_num_workers(bad)


def test_pinned_memory_and_prefetch_only_on_cuda(tmp_path):
    write_domain_shards(_photo_tree(tmp_path / "tree"), tmp_path / "out", dataset="t", domain="d",
                        classes=["apple", "mango"], maxcount=2, seed=0)
    kw = dict(transform=eval_transform({**CFG, "size": 32}), batch_size=2, shuffle=False, with_labels=True)
    cuda = image_loader(tmp_path / "out", num_workers=2, device="cuda", **kw)
    assert cuda.pin_memory and cuda.prefetch_factor == shards.PREFETCH_FACTOR == 4 and cuda.num_workers == 2
    cuda0 = image_loader(tmp_path / "out", num_workers=0, device=torch.device("cuda", 1), **kw)
    assert cuda0.pin_memory and cuda0.prefetch_factor is None  # no workers, nothing to prefetch
    for device in ("cpu", None):
        cpu = image_loader(tmp_path / "out", num_workers=2, device=device, **kw)
        assert not cpu.pin_memory and cpu.prefetch_factor == 2  # torch's default
    assert len(image_loader(tmp_path / "out", num_workers="auto", **kw)) == len(cuda)  # same batch count


def test_params_accept_auto_workers():
    from pipeline.schema import integer

    field = integer(0, words=("auto",))
    assert field.check("auto") is None and field.check(4) is None
    assert field.check("many") == "expected an integer >= 0 or 'auto'"


def test_eval_passes_decode_at_the_size_the_transform_needs(tmp_path, monkeypatch):
    """encode_shards (features, predict) asks the transform for its decode size: the same tensors as a loader
    given that size by hand, and other tensors than a full decode."""
    from pipeline.features import cache

    write_domain_shards(_photo_tree(tmp_path / "tree"), tmp_path / "out", dataset="t", domain="d",
                        classes=["apple", "mango"], maxcount=2, seed=0)
    transform = eval_transform({**CFG, "size": 64})
    keys, feats, _ = cache.encode_shards(lambda x: x.flatten(1), tmp_path / "out", transform=transform,
                                         batch_size=2, device="cpu", precision="fp32")
    kw = dict(transform=transform, batch_size=2, shuffle=False, with_labels=True)
    for decode_size, same in ((64, True), (None, False)):
        by_key = _by_key(image_loader(tmp_path / "out", decode_size=decode_size, **kw))
        expected = torch.nn.functional.normalize(torch.stack([by_key[k].flatten() for k in keys]), dim=-1)
        assert torch.equal(feats, expected) == same
