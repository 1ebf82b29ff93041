"""Decode JPEG batches on the GPU (nvJPEG through ``torchvision.io.decode_jpeg``) for feature caching.

The CPU path (:func:`pipeline.data.shards.image_loader`) decodes and transforms one PIL image at a time;
for a large teacher on a fast GPU that leaves the GPU waiting. Here the raw JPEG bytes of a batch are read
straight from the tars (checked against the manifest like every reader, :func:`checked_keys`), decoded in
one call on the device, and resized / centre-cropped / normalised there, mirroring open_clip's eval
preprocess (shorter side to ``size`` bicubic, centre crop, CLIP mean/std). Batches come in manifest order.

The resize runs on the tensor with antialiasing, not in PIL, so features differ slightly from the CPU path
(a few 1e-2 per pixel after normalisation): a cache made with one decoder is not byte-identical to one made
with the other. Eval only: there are no random views here.
"""
from __future__ import annotations

from pathlib import Path
from operator import itemgetter
from typing import Iterator, Sequence

import pipeline  # noqa: F401  (installs the torchvision guard before torchvision is imported)
import torch
from torch.nn import functional as F

from pipeline.data.shards import checked_keys, readable_shard, shard_plan
from pipeline.data.tar_reader import tar_samples

DECODERS = ("cpu", "gpu")


def check_decoder(decode: str, device: str) -> None:
    """Refuse an unknown decoder, or GPU decoding without a CUDA device (nvJPEG needs one)."""
    if decode not in DECODERS:
        raise ValueError(f"runtime.decode: {decode!r} is not one of {DECODERS}")
    if decode == "gpu" and not str(device).startswith("cuda"):
        raise ValueError(f"runtime.decode: gpu decodes JPEGs with nvJPEG and needs a CUDA device, but this item "
                         f"runs on {device!r}; set runtime.decode: cpu (or run it on a GPU)")


def jpeg_batches(shard_dir: str | Path, batch_size: int) -> Iterator[tuple[list[str], list[bytes]]]:
    """``(keys, raw JPEG bytes)`` batches over every shard, in manifest key order; each shard is checked
    against the manifest as it is read. Batches span shard boundaries; only the last may be short."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard_dir = Path(shard_dir)
    keys: list[str] = []
    data: list[bytes] = []
    for shard, expected in shard_plan(shard_dir).items():
        with readable_shard(shard_dir / shard):
            for sample in checked_keys(tar_samples(shard_dir / shard, (".jpg",)), shard=shard_dir / shard,
                                       expected=expected, key=itemgetter("__key__")):
                keys.append(sample["__key__"])
                data.append(sample["jpg"])
                if len(keys) == batch_size:
                    yield keys, data
                    keys, data = [], []
    if keys:
        yield keys, data


def eval_geometry(preprocess: dict) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(size, mean, std)`` of an open_clip eval preprocess config; only the default eval pipeline
    (shortest-side bicubic resize, centre crop) is mirrored, anything else is refused rather than guessed."""
    size = preprocess["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    if isinstance(preprocess["size"], (list, tuple)) and len(set(preprocess["size"])) != 1:
        raise ValueError(f"GPU decoding supports square eval crops only, got size {preprocess['size']}")
    if preprocess.get("interpolation", "bicubic") != "bicubic" or preprocess.get("resize_mode", "shortest") != "shortest":
        raise ValueError("GPU decoding mirrors open_clip's default eval preprocess (bicubic, resize_mode "
                         f"'shortest') only, got {preprocess}; use runtime.decode: cpu")
    return int(size), tuple(preprocess["mean"]), tuple(preprocess["std"])


def resize_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """One uint8 [3, H, W] image -> float [3, size, size] in 0..255: shorter side to ``size`` (bicubic,
    antialiased like PIL's), then the centre crop, as torchvision's Resize(size) + CenterCrop(size)."""
    h, w = image.shape[-2:]
    # torchvision's Resize(int) rounds the longer side down (int(), not round()); mirror it.
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = image.unsqueeze(0).float()
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return x[0, :, top:top + size, left:left + size].clamp_(0, 255)


def assemble(images: Sequence[torch.Tensor], *, size: int, mean: Sequence[float], std: Sequence[float]
             ) -> torch.Tensor:
    """Decoded uint8 images (any sizes, on one device) -> a normalised float batch [B, 3, size, size].

    Images have different sizes, so each is resized on its own; the normalisation runs once on the batch.
    """
    batch = torch.stack([resize_crop(img, size) for img in images])
    mean_t = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=batch.device).view(1, 3, 1, 1) * 255
    return (batch - mean_t) / std_t


JPEG_MAGIC = b"\xff\xd8"


def decode_jpegs(data: list[bytes], device: str) -> list[torch.Tensor]:
    """Decode raw image bytes into RGB uint8 [3, H, W] tensors on ``device``: the JPEGs in one batched
    nvJPEG call (grey or CMYK files come out RGB, like PIL's ``convert("RGB")``); anything else (VisDA's
    PNGs, which shards keep lossless) on the CPU with ``decode_image`` and then moved, in the same order."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    encoded = [torch.frombuffer(bytearray(raw), dtype=torch.uint8) for raw in data]
    jpeg = [i for i, raw in enumerate(data) if raw[:2] == JPEG_MAGIC]
    out: list[torch.Tensor | None] = [None] * len(data)
    if jpeg:
        for i, image in zip(jpeg, decode_jpeg([encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)):
            out[i] = image
    for i in set(range(len(data))) - set(jpeg):
        out[i] = decode_image(encoded[i], mode=ImageReadMode.RGB).to(device)
    return out


def gpu_image_batches(shard_dir: str | Path, *, preprocess: dict, batch_size: int, device: str
                      ) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``(keys, images)`` batches on ``device``, in manifest order, decoded and transformed on the GPU."""
    check_decoder("gpu", device)
    size, mean, std = eval_geometry(preprocess)
    for keys, data in jpeg_batches(shard_dir, batch_size):
        yield keys, assemble(decode_jpegs(data, device), size=size, mean=mean, std=std)
