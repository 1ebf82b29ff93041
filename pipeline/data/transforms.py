"""Training-time image transforms (PIL image -> normalised tensor), built from a model's preprocess config.

Every transform here takes the model's open_clip preprocess config
(``open_clip.get_model_preprocess_cfg(model)`` or :func:`pipeline.models.factory.preprocess_config`: ``size``
as an int or an (h, w) pair, ``mean``, ``std``, ``interpolation``, ``resize_mode``; tuples or JSON lists), so
input size and normalisation always follow the model. The geometry of each kind copies an original code base;
where the original hard-codes a 224-px model, its numbers are scaled by ``size / 224`` for other input sizes
(and are exactly the original's at 224).

Kinds of :func:`train_transform` (``TRAIN_TRANSFORMS``):

``none``
    The model's deterministic eval transform (:func:`eval_transform`: open_clip's
    ``image_transform(..., is_train=False)``, what ``open_clip.create_model_and_transforms`` returns as the
    val transform, run as :class:`EvalTransform`): no augmentation.
``dassl``
    The Dassl.pytorch lineage (CoOp, PromptKD, DAPL, PDA; Dassl ``random_resized_crop`` + ``random_flip`` +
    ``normalize``): RandomResizedCrop(size, scale=(0.08, 1), bicubic) -> RandomHorizontalFlip -> ToTensor ->
    Normalize.
``cmkd``
    CMKD (Wenlve-Zhou/VLP-UDA, ``utils/data_loader.py``, Office-Home / Office-31 / ImageCLEF / DomainNet):
    Resize((r, r)) -> RandomCrop(size) -> RandomHorizontalFlip -> ToTensor -> Normalize, with
    r = round(size*256/224) (256 for a 224-px model).
``cmkd_visda``
    CMKD's VisDA train view: Resize((size, size)) -> RandomHorizontalFlip -> CenterCrop(size) -> ToTensor ->
    Normalize. The original resizes to the square ``[224, 224]`` (aspect ratio not kept), so the centre crop
    is a no-op; both are kept as written there.

:func:`strong_transform` is CMKD's FixMatch strong view (``utils/FixMatch.py``).

The CMKD resizes use torchvision's default interpolation, bilinear, as the original does (it does not pass
one); the Dassl crop is bicubic, as in the CoOp-family configs (``INPUT.INTERPOLATION: bicubic``).

Random draws come from torch's default CPU generator (torchvision) and from the ``random`` and ``np.random``
that timm's RandAugment module calls. :func:`pipeline.data.seeding.seeded_call` (used by
:func:`pipeline.data.shards.image_loader` when given ``views``) seeds torch's generator per sample and view
and hands timm's module private seeded generators, which makes these transforms reproducible. A new
transform must draw from one of those two.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

import pipeline  # noqa: F401  (installs the torchvision guard before torchvision / timm / open_clip imports)
import open_clip
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from pipeline.data.shards import read_manifest

TRAIN_TRANSFORMS: tuple[str, ...] = ("none", "dassl", "cmkd", "cmkd_visda")

#: CMKD's FixMatch RandAugment: 2 ops per image, magnitude 10, Gaussian magnitude noise (std 0.5).
RANDAUGMENT_CONFIG = "rand-n2-m10-mstd0.5"

_REFERENCE_SIZE = 224  # the input size the originals' numbers are written for


def _size_hw(preprocess_cfg: Mapping[str, Any]) -> tuple[int, int]:
    size = preprocess_cfg["size"]
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def _scaled(value: float, hw: tuple[int, int]) -> tuple[int, int]:
    """``value`` (a length written for 224-px inputs) for the model's (h, w)."""
    return tuple(int(round(value * s / _REFERENCE_SIZE)) for s in hw)  # type: ignore[return-value]


def _normalize(preprocess_cfg: Mapping[str, Any]) -> T.Normalize:
    return T.Normalize(mean=tuple(preprocess_cfg["mean"]), std=tuple(preprocess_cfg["std"]))


def eval_transform(preprocess_cfg: Mapping[str, Any]) -> Callable:
    """The model's eval transform: open_clip's ``image_transform(..., is_train=False)`` (what
    ``open_clip.create_model_and_transforms`` returns), run as :class:`EvalTransform` where that is possible."""
    defaults = open_clip.transform.PreprocessCfg()
    size = preprocess_cfg.get("size", defaults.size)
    resize_mode = preprocess_cfg.get("resize_mode", defaults.resize_mode)
    interpolation = preprocess_cfg.get("interpolation", defaults.interpolation)
    mean = tuple(preprocess_cfg.get("mean", defaults.mean))
    std = tuple(preprocess_cfg.get("std", defaults.std))
    reference = open_clip.image_transform(
        size if isinstance(size, int) else tuple(size), is_train=False, mean=mean, std=std,
        resize_mode=resize_mode, interpolation=interpolation,
        fill_color=preprocess_cfg.get("fill_color", defaults.fill_color))
    square = isinstance(size, int) or len(set(size)) == 1
    if resize_mode == "shortest" and square and interpolation in EvalTransform.RESAMPLE:
        return EvalTransform(size if isinstance(size, int) else int(size[0]), interpolation, mean, std, reference)
    return reference


def decode_size_of(transform: Callable) -> int | None:
    """The shorter side an eval transform needs (:attr:`EvalTransform.decode_size`), or ``None`` (decode
    in full) for a transform that does not say: what loaders pass as ``decode_size`` for eval passes."""
    return getattr(transform, "decode_size", None)


class EvalTransform:
    """open_clip's default eval transform (shorter side to ``size``, centre crop, to tensor, normalise) in
    fewer passes over the pixels, for the loaders that feed the features stage and every evaluation.

    The resize goes straight to the centre crop: PIL resamples only the ``box`` of the source that the crop
    keeps (the same mapping as torchvision's ``Resize(size)`` then ``CenterCrop(size)``, longer side rounded
    down as there), so the pixels the crop would throw away are never computed; the tensor conversion and
    normalisation run in place on one copy. Images whose shorter side already is ``size`` (stored at the
    model's size, or the digits at 32 px) skip the resize in both and come out bit-identical to open_clip's
    transform; resized ones differ by resampling rounding (mean absolute difference about 4e-4 of a normalised
    pixel on photos, tested). Images that are not RGB go through open_clip's transform itself."""

    RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}

    def __init__(self, size: int, interpolation: str, mean: tuple, std: tuple, reference: Callable):
        self.size, self.resample, self.reference = size, self.RESAMPLE[interpolation], reference
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @property
    def decode_size(self) -> int:
        """The shorter side this transform needs: loaders decode large JPEGs at a reduced scale down to it."""
        return self.size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            return self.reference(img)
        s, (w, h) = self.size, img.size
        # torchvision's Resize(int): shorter side to s, the longer int(s * long / short) (rounded down)
        new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        left, top = int(round((new_w - s) / 2.0)), int(round((new_h - s) / 2.0))  # CenterCrop's offsets
        if (new_w, new_h) == (w, h):
            if (w, h) != (s, s):
                img = img.crop((left, top, left + s, top + s))
        else:
            sx, sy = w / new_w, h / new_h
            img = img.resize((s, s), self.resample, box=(left * sx, top * sy, (left + s) * sx, (top + s) * sy))
        # ToTensor + Normalize, the same float operations in the same order, on one copy
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return x.float().div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, crop-box resize + fused normalise; reference={self.reference})"


def train_transform(kind: str, preprocess_cfg: Mapping[str, Any]) -> Callable:
    """The training view ``kind`` (one of ``TRAIN_TRANSFORMS``) for a model with ``preprocess_cfg``.

    Returns a PIL (RGB) -> float tensor ``[3, h, w]`` transform, normalised with the model's mean and std.
    See the module docstring for what each kind does and which original it reproduces. Random kinds draw
    from the global generators: pass them to ``image_loader(..., views=...)`` for seeded, reproducible draws.
    """
    if kind not in TRAIN_TRANSFORMS:
        raise ValueError(f"unknown train transform {kind!r}; expected one of {TRAIN_TRANSFORMS}")
    if kind == "none":
        return eval_transform(preprocess_cfg)
    hw = _size_hw(preprocess_cfg)
    tail = [T.ToTensor(), _normalize(preprocess_cfg)]
    if kind == "dassl":
        # Dassl.pytorch dassl/data/transforms/transforms.py: random_resized_crop (RRCROP_SCALE (0.08, 1.0))
        # -> random_flip -> ToTensor -> normalize, interpolation bicubic in the CoOp-family configs.
        return T.Compose([T.RandomResizedCrop(hw, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), *tail])
    if kind == "cmkd":
        # VLP-UDA utils/data_loader.py (non-VisDA train): Resize([256, 256]) -> RandomCrop(224) -> flip.
        return T.Compose([T.Resize(_scaled(256, hw), interpolation=InterpolationMode.BILINEAR),
                          T.RandomCrop(hw), T.RandomHorizontalFlip(), *tail])
    # cmkd_visda. VLP-UDA utils/data_loader.py (VisDA train): Resize([224, 224]) -> flip -> CenterCrop(224).
    return T.Compose([T.Resize(hw, interpolation=InterpolationMode.BILINEAR), T.RandomHorizontalFlip(),
                      T.CenterCrop(hw), *tail])


def randaugment_hparams(preprocess_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """CMKD's RandAugment hyper-parameters for this model.

    The original (``utils/FixMatch.py``) passes ``translate_const=int(224 * 0.45)`` (100) and
    ``img_mean=round(255 * CLIP mean)``, which is (123, 117, 104); here the same formulas use the model's
    size (shorter side) and mean. ``img_mean`` is the fill colour of the geometric ops. ``translate_const``
    only affects the absolute TranslateX/Y ops, which the default RandAugment op set (in timm and in the
    original) does not include: it translates by a fraction of the image (TranslateXRel/YRel, up to 45 %).
    """
    side = min(_size_hw(preprocess_cfg))
    return {"translate_const": int(side * 0.45),
            "img_mean": tuple(min(255, round(255 * m)) for m in preprocess_cfg["mean"])}


def strong_transform(preprocess_cfg: Mapping[str, Any], *, visda: bool = False) -> Callable:
    """CMKD's FixMatch strong view (Wenlve-Zhou/VLP-UDA, ``utils/FixMatch.py``, ``TransformFixMatch.strong``).

    Resize((r, r)) -> CenterCrop(size) -> RandomHorizontalFlip -> ColorJitter(0.4, 0.4, 0.4, 0) (always
    applied; the original wraps it in ``RandomApply(p=1.0)``) -> RandAugment ``rand-n2-m10-mstd0.5`` ->
    ToTensor -> Normalize, with r = round(size*256/224) (256 for a 224-px model), or r = size with
    ``visda=True`` (the original's 224 for VisDA). The resize is bilinear, the original's default.

    RandAugment is timm's ``rand_augment_transform`` (:func:`randaugment_hparams`), which matches the
    original's vendored copy of timm's RandAugment: the same 15 ops, each applied with p = 0.5, Gaussian
    magnitude noise clipped to [0, 10] (Cubuk et al. 2020, as used by FixMatch, Sohn et al. 2020).
    """
    hw = _size_hw(preprocess_cfg)
    resize = hw if visda else _scaled(256, hw)
    return T.Compose([
        T.Resize(resize, interpolation=InterpolationMode.BILINEAR),
        T.CenterCrop(hw),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.4, 0.4, 0.4, 0.0),
        rand_augment_transform(RANDAUGMENT_CONFIG, randaugment_hparams(preprocess_cfg)),
        T.ToTensor(),
        _normalize(preprocess_cfg),
    ])


# ----------------------------------------------------------------------------------- stored image size


class StoreSizeError(ValueError):
    """The shards store images smaller than a model's preprocess needs (``data.store_max_side`` too low)."""


def needed_side(preprocess_cfg: Mapping[str, Any], kinds: tuple[str, ...] = ()) -> int:
    """The shorter side (px) a stored image needs so that the eval transform and the train views ``kinds``
    never upsample it: the model's input size, or ``r`` of the ``cmkd`` kinds' Resize((r, r)) (256 for a
    224-px model; its strong view resizes the same). Every transform here sizes by the shorter side (or a
    square), which is why ``data.store_max_side`` bounds the shorter side."""
    hw = _size_hw(preprocess_cfg)
    need = max(hw)
    if "cmkd" in kinds:
        need = max(need, *_scaled(256, hw))
    return need


def check_store_size(shard_dirs, preprocess_cfg: Mapping[str, Any], *, role: str, name: str,
                     kinds: tuple[str, ...] = ()) -> None:
    """Raise :class:`StoreSizeError` when a shard folder's manifest says its images were stored with a
    shorter side below what the ``role`` model ``name``'s preprocess (and train views ``kinds``) needs;
    ``store_max_side: null`` (raw bytes) always passes. The one check the features and distill stages make
    before reading shards for a model."""
    need = needed_side(preprocess_cfg, kinds)
    for shard_dir in shard_dirs:
        stored = read_manifest(shard_dir).get("store_max_side")
        if stored is not None and stored < need:
            view = " with the cmkd train view" if need > max(_size_hw(preprocess_cfg)) else ""
            raise StoreSizeError(f"data.store_max_side: {stored} is smaller than the {need} px the {role}'s "
                                 f"preprocess{view} needs (model.{role}: {name}); set it to at least {need} (or "
                                 f"null) and re-run dvc repro -s shard")
