"""Let torchvision (and so timm and open_clip) import on a CPU build of torch.

PyPI has no CPU torchvision: the 0.28.0 wheel is a CUDA build whose compiled ops cannot load on CPU torch,
and its import then dies registering fake kernels for ``torchvision::nms`` / ``qnms``. Defining those two
schemas first lets the pure-Python parts (transforms, models) import; the compiled ops still fail if called,
which this project never does (images are decoded with PIL).
"""
from __future__ import annotations

import importlib.metadata

_LIBRARY = None  # kept alive so the schema definitions stay registered


def install() -> bool:
    """Define the missing torchvision op schemas when needed; return True if it acted."""
    global _LIBRARY
    if _LIBRARY is not None:
        return True
    try:
        tv_version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return False
    import torch

    if torch.version.cuda is not None or "+cpu" in tv_version:
        return False
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = lib
    return True
