"""Training transforms (pipeline.data.transforms) and the seeded views of the shard loader."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

import pipeline  # noqa: F401  (torchvision guard first)
import open_clip
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from torchvision import transforms as T

from pipeline.data.seeding import seeded_call, view_seed
from pipeline.data.shards import image_loader, read_manifest
from pipeline.data.transforms import (TRAIN_TRANSFORMS, randaugment_hparams, strong_transform,
                                      train_transform)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CFG_224 = {"size": 224, "mode": "RGB", "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic",
           "resize_mode": "shortest", "fill_color": 0}
# As JSON gives it back (pipeline.models.factory.preprocess_config): lists, a non-square size, other stats.
CFG_WIDE = {"size": [64, 96], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0], "interpolation": "bilinear",
            "resize_mode": "shortest"}
STRONG = ("strong", "strong_visda")


@pytest.fixture(scope="module")
def cfg32(teacher):
    cfg = open_clip.get_model_preprocess_cfg(teacher.model)
    assert tuple(cfg["size"]) == (32, 32)
    return cfg


def _build(kind: str, cfg: dict):
    if kind in STRONG:
        return strong_transform(cfg, visda=kind == "strong_visda")
    return train_transform(kind, cfg)


def _photo(h: int = 150, w: int = 200, seed: int = 0) -> Image.Image:
    """A smooth, non-square test image (gradients plus a little noise), so crops and flips change pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 9.0)], -1)
    pixels = pixels + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _shard_images(shard_dir, n: int) -> list[Image.Image]:
    out = []
    for shard in read_manifest(shard_dir)["shards"]:
        with tarfile.open(shard_dir / shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg") and len(out) < n:
                    out.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
    return out


def _hw(cfg) -> tuple[int, int]:
    size = cfg["size"]
    return (size, size) if isinstance(size, int) else tuple(size)


@pytest.mark.parametrize("kind", TRAIN_TRANSFORMS + STRONG)
@pytest.mark.parametrize("which", ["32px", "224px", "wide"])
def test_shape_and_normalisation(kind, which, cfg32):
    cfg = {"32px": cfg32, "224px": CFG_224, "wide": CFG_WIDE}[which]
    h, w = _hw(cfg)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    transform = _build(kind, cfg)
    out = seeded_call(transform, _photo(), view_seed(0, 0, "k", 0))
    assert out.shape == (3, h, w) and out.dtype == torch.float32
    # Normalised with the model's mean / std: the values are those of a [0, 1] image.
    pixels = out * std + mean
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    if kind not in STRONG:
        # Geometry only: a flat colour stays that colour, exactly (c / 255 - mean) / std.
        colour = (200, 90, 30)
        flat = transform(Image.new("RGB", (120, 90), colour))
        expected = (torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std
        assert torch.allclose(flat, expected.expand(3, h, w), atol=1e-5)


def test_none_is_the_model_preprocess(teacher, cfg32, digits_shards):
    none = train_transform("none", cfg32)
    images = _shard_images(digits_shards["mnist"], 4) + [_photo(), _photo(40, 25, seed=1)]
    for img in images:
        assert torch.equal(none(img), teacher.preprocess(img))
    # Also from the JSON form of the config the pipeline stores (lists, not tuples).
    from pipeline.models.factory import preprocess_config
    assert torch.equal(train_transform("none", preprocess_config(teacher.model))(images[-1]),
                       teacher.preprocess(images[-1]))


@pytest.mark.parametrize("hw", [(224, 224), (224, 300), (371, 224), (150, 200), (1200, 900), (333, 517)])
def test_eval_transform_matches_open_clip(hw):
    """The pipeline's eval transform (crop-box resize, fused normalise) against open_clip's own: bit-identical
    where no resize is needed (shorter side already the input size), within resampling rounding otherwise."""
    from pipeline.data.transforms import EvalTransform, eval_transform

    fast = eval_transform(CFG_224)
    assert isinstance(fast, EvalTransform)
    img = _photo(*hw, seed=sum(hw))
    got, expected = fast(img), fast.reference(img)
    assert got.shape == expected.shape == (3, 224, 224) and got.dtype == torch.float32
    if min(hw) == 224:
        assert torch.equal(got, expected)
    else:
        diff = (got - expected).abs()
        assert float(diff.mean()) < 2e-3 and float(diff.max()) < 0.2
    grey = img.convert("L")  # not RGB: open_clip's own transform, exactly
    assert torch.equal(fast(grey), fast.reference(grey))


def test_eval_transform_falls_back_where_it_does_not_mirror_open_clip():
    from pipeline.data.transforms import EvalTransform, eval_transform

    from pipeline.data.transforms import decode_size_of

    assert decode_size_of(eval_transform(CFG_224)) == 224  # loaders decode large JPEGs down to this side
    assert decode_size_of(eval_transform(CFG_WIDE)) is None  # open_clip's own: decoded in full
    assert not isinstance(eval_transform(CFG_WIDE), EvalTransform)  # non-square input
    assert not isinstance(eval_transform({**CFG_224, "resize_mode": "squash"}), EvalTransform)
    squash = eval_transform({**CFG_224, "resize_mode": "squash"})
    assert squash(_photo()).shape == (3, 224, 224)


def test_loaded_models_use_it_and_digits_stay_bit_identical(teacher, digits_shards):
    from pipeline.data.transforms import EvalTransform

    assert isinstance(teacher.preprocess, EvalTransform)
    _, _, reference = open_clip.create_model_and_transforms("digits-vit-teacher")
    for img in _shard_images(digits_shards["mnist"], 6) + [Image.new("RGB", (28, 28), (9, 80, 200))]:
        assert torch.equal(teacher.preprocess(img), reference(img))


def test_original_numbers_at_224():
    """At 224 px the CMKD views use the original's numbers exactly (Wenlve-Zhou/VLP-UDA)."""
    def steps(transform):
        return {type(t): t for t in transform.transforms}

    cmkd = steps(train_transform("cmkd", CFG_224))
    assert cmkd[T.Resize].size == (256, 256) and cmkd[T.RandomCrop].size == (224, 224)
    visda = steps(train_transform("cmkd_visda", CFG_224))
    assert visda[T.Resize].size == (224, 224) and visda[T.CenterCrop].size == (224, 224)
    dassl = steps(train_transform("dassl", CFG_224))[T.RandomResizedCrop]
    assert dassl.scale == (0.08, 1.0) and dassl.interpolation == T.InterpolationMode.BICUBIC
    assert steps(strong_transform(CFG_224))[T.Resize].size == (256, 256)
    assert steps(strong_transform(CFG_224, visda=True))[T.Resize].size == (224, 224)
    assert randaugment_hparams(CFG_224) == {"translate_const": 100, "img_mean": (123, 117, 104)}
    # Scaled for other input sizes.
    assert steps(train_transform("cmkd", {**CFG_224, "size": 32}))[T.Resize].size == (37, 37)
    assert steps(train_transform("cmkd", {**CFG_224, "size": 336}))[T.Resize].size == (384, 384)


def test_strong_view_uses_timm_randaugment(cfg32):
    strong = strong_transform(cfg32)
    types = [type(t) for t in strong.transforms]
    assert types == [T.Resize, T.CenterCrop, T.RandomHorizontalFlip, T.ColorJitter, RandAugment, T.ToTensor,
                     T.Normalize]
    randaug = strong.transforms[types.index(RandAugment)]
    assert randaug.num_layers == 2 and len(randaug.ops) == 15
    assert all(op.prob == 0.5 and op.magnitude == 10 and op.magnitude_std == 0.5 for op in randaug.ops)
    jitter = strong.transforms[types.index(T.ColorJitter)]
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4) and jitter.hue is None

    weak = train_transform("cmkd", cfg32)
    img = _photo()
    a = seeded_call(weak, img, view_seed(0, 0, "key", 0))
    b = seeded_call(strong, img, view_seed(0, 0, "key", 1))
    assert not torch.equal(a, b)
    # Seeded: the same seed gives the same strong view; other seeds give other views.
    again = seeded_call(strong, img, view_seed(0, 0, "key", 1))
    assert torch.equal(b, again)
    others = [seeded_call(strong, img, view_seed(0, e, "key", 1)) for e in range(1, 4)]
    assert not any(torch.equal(b, o) for o in others)



def test_strong_view_ignores_other_threads_global_generators(cfg32):
    """Prefect's background threads draw from Python's global ``random``; a view must not depend on them."""
    import random
    import threading

    strong = strong_transform(cfg32)
    img = _photo()
    quiet = [seeded_call(strong, img, view_seed(0, e, "key", 1)) for e in range(20)]
    stop = threading.Event()

    def draw():
        while not stop.is_set():
            random.random()
            np.random.random()

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        busy = [seeded_call(strong, img, view_seed(0, e, "key", 1)) for e in range(20)]
    finally:
        stop.set()
        thread.join()
    assert all(torch.equal(a, b) for a, b in zip(quiet, busy))


def test_unknown_kind():
    with pytest.raises(ValueError, match="dassl"):
        train_transform("autoaugment", CFG_224)


def _views_pass(shard_dir, views, *, epoch: int, num_workers: int = 0) -> dict:
    out = {}
    for keys, images, labels in image_loader(shard_dir, views=views, batch_size=16, shuffle=True, seed=7,
                                             epoch=epoch, with_labels=True, num_workers=num_workers):
        for i, key in enumerate(keys):
            image = tuple(v[i] for v in images) if isinstance(images, tuple) else images[i]
            out[key] = image, int(labels[i])
    return out


def test_loader_weak_strong_views_are_reproducible(cfg32, digits_shards):
    shard_dir = digits_shards["usps"]
    views = (train_transform("cmkd", cfg32), strong_transform(cfg32))
    a = _views_pass(shard_dir, views, epoch=0)
    assert len(a) == len(read_manifest(shard_dir)["keys"])
    for (weak, strong), _ in a.values():
        assert weak.shape == strong.shape == (3, 32, 32)
        assert not torch.equal(weak, strong)
    for workers in (0, 2):
        other = _views_pass(shard_dir, views, epoch=0, num_workers=workers)
        assert sorted(other) == sorted(a)
        for key, ((weak, strong), label) in other.items():
            assert torch.equal(weak, a[key][0][0]) and torch.equal(strong, a[key][0][1])
            assert label == a[key][1]
    # A new epoch draws new views (each sample's crop / flip / RandAugment changes; a few may repeat).
    b = _views_pass(shard_dir, views, epoch=1)
    same = sum(torch.equal(b[k][0][1], a[k][0][1]) for k in a)
    assert same == 0
    assert sum(torch.equal(b[k][0][0], a[k][0][0]) for k in a) < len(a) // 2


def test_loader_single_view_and_worker_counts(cfg32, digits_shards):
    shard_dir = digits_shards["mnist"]
    views = (train_transform("dassl", cfg32),)
    a = _views_pass(shard_dir, views, epoch=3)
    assert all(img.shape == (3, 32, 32) for img, _ in a.values())
    w1 = _views_pass(shard_dir, views, epoch=3, num_workers=1)
    assert all(torch.equal(img, a[k][0]) for k, (img, _) in w1.items()) and sorted(w1) == sorted(a)


def test_store_size_check_names_setting_value_model_and_fix(tmp_path):
    import json

    from pipeline.data.transforms import StoreSizeError, check_store_size, needed_side

    cfg = {"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert needed_side(cfg) == 224 and needed_side(cfg, ("dassl",)) == 224 and needed_side(cfg, ("cmkd",)) == 256
    assert needed_side({**cfg, "size": [336, 336]}, ("cmkd",)) == 384
    dirs = {}
    for stored in (None, 224, 200, 256):
        dirs[stored] = tmp_path / f"s{stored}"
        dirs[stored].mkdir()
        (dirs[stored] / "manifest.json").write_text(json.dumps({"store_max_side": stored}))
    check_store_size([dirs[None], dirs[224]], cfg, role="teacher", name="ViT-B-16")  # passes
    check_store_size([dirs[256]], cfg, role="student", name="ViT-B-16", kinds=("cmkd",))
    with pytest.raises(StoreSizeError) as err:
        check_store_size([dirs[224], dirs[200]], cfg, role="teacher", name="ViT-B-16")
    assert str(err.value) == ("data.store_max_side: 200 is smaller than the 224 px the teacher's preprocess needs "
                              "(model.teacher: ViT-B-16); set it to at least 224 (or null) and re-run dvc repro -s "
                              "shard")
    with pytest.raises(StoreSizeError, match="the 256 px the student's preprocess with the cmkd train view needs"):
        check_store_size([dirs[224]], cfg, role="student", name="RN50", kinds=("cmkd",))
    assert isinstance(err.value, ValueError)  # the stage entry prints it as one line
