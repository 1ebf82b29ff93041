"""Images/s through the shard loader vs. a plain image-folder DataLoader, same images and transform.

    python -m bench.loader_throughput --images 2000 --batch-size 64 --num-workers 0 --repeats 3
    python -m bench.loader_throughput --realistic --images 300 --repeats 2

Default: builds a synthetic 10-class tree of small random JPEGs in a temp dir, shards it, then alternates
full passes of (a) ``image_loader`` over the shards and (b) a DataLoader over ``folder_dataset`` so drift
(page cache, CPU clocks) hits both alike. Prints one JSON object (medians) to stdout.

``--realistic``: photo-like JPEGs at Office-Home-like sizes (300-1500 px a side), cut and resized from the
photos scikit-learn ships (:func:`sklearn.datasets.load_sample_images`), to ViT-B/16's 224-px eval input,
with 0 and 1 loader workers: (a) the image-folder loader and (b) raw-byte shards, both with open_clip's own
eval transform (what a user of ``create_model_and_transforms`` has); (c) shards stored with
``store_max_side`` (default 256, as the benchmark configs) read the pipeline's way (reduced-scale JPEG decoding and
:class:`pipeline.data.transforms.EvalTransform`), plus (b2) raw shards read the pipeline's way. Also reports bytes on disk and shard-writing time; writes the JSON to
``bench/results/loader_throughput_realistic.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import pipeline  # noqa: F401  (torchvision guard before torchvision)
import torch
from PIL import Image
from torchvision import transforms

from pipeline.data.shards import folder_dataset, image_loader, write_domain_shards

CLASSES = [f"class_{i}" for i in range(10)]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_like_transform() -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def make_tree(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / CLASSES[i % len(CLASSES)] / f"{i:06d}.jpg", quality=90)


def timed_pass(loader, n_expected: int) -> float:
    """Images/s for one full pass (loader start-up included, as a stage would pay it)."""
    start = time.perf_counter()
    seen = sum(len(batch[0]) for batch in loader)
    elapsed = time.perf_counter() - start
    assert seen == n_expected, (seen, n_expected)
    return seen / elapsed


# open_clip's ViT-B-16 eval preprocess (OpenAI weights): shorter side to 224, bicubic, centre crop
VIT_B16_PREPROCESS = {"size": 224, "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic",
                      "resize_mode": "shortest"}
RESULTS = Path(__file__).resolve().parent / "results" / "loader_throughput_realistic.json"


def make_photo_tree(root: Path, n: int, seed: int = 0) -> None:
    """``n`` photo-like JPEGs (quality 90) 300-1500 px a side: random crops (30-100 % of a side) of the
    scikit-learn sample photos, resized bicubically to a random size and aspect, spread over the classes."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(img) for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.3, 1.0)), int(h * rng.uniform(0.3, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        long_side = int(rng.integers(300, 1501))
        aspect = rng.uniform(0.6, 1.6)  # width / height
        short_side = max(300, int(long_side / aspect if aspect >= 1 else long_side * aspect))
        size = (long_side, short_side) if aspect >= 1 else (short_side, long_side)
        img = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(root / CLASSES[i % len(CLASSES)] / f"{i:06d}.jpg", quality=90)


def _bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern))


def warm_forkserver() -> None:
    """Start the forkserver every loader's workers fork from, with the pipeline's preload, before timing:
    its one-time start (importing torch, seconds) is then in no pass, and every loader, the folder one
    included, starts its workers the same way."""
    import multiprocessing
    from multiprocessing import forkserver

    from pipeline.data.shards import FORKSERVER_PRELOAD

    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    forkserver.ensure_running()


def realistic(args) -> dict:
    """The --realistic comparison (module docstring); returns the result dict."""
    warm_forkserver()
    from pipeline.data.sharding import JPEG_QUALITY
    from pipeline.data.transforms import eval_transform, needed_side

    transform = eval_transform(VIT_B16_PREPROCESS)  # the pipeline's (EvalTransform)
    reference = transform.reference  # open_clip's own, what create_model_and_transforms returns
    need = needed_side(VIT_B16_PREPROCESS)
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="loader-bench-real-") as tmp:
        image_dir, raw_dir, stored_dir = Path(tmp) / "images", Path(tmp) / "raw", Path(tmp) / "stored"
        make_photo_tree(image_dir, args.images)
        sides = [min(Image.open(p).size) for p in sorted(image_dir.rglob("*.jpg"))]
        start = time.perf_counter()
        write_domain_shards(image_dir, raw_dir, dataset="photos", domain="bench", classes=CLASSES,
                            maxcount=args.maxcount, seed=0, workers=1)
        raw_write_s = time.perf_counter() - start
        start = time.perf_counter()
        stored = write_domain_shards(image_dir, stored_dir, dataset="photos", domain="bench", classes=CLASSES,
                                     maxcount=args.maxcount, seed=0, workers=1,
                                     store_max_side=args.store_max_side)
        stored_write_s = time.perf_counter() - start
        folder = folder_dataset(image_dir, classes=CLASSES, transform=reference)

        def loaders(workers: int):
            common = dict(batch_size=args.batch_size, shuffle=True, with_labels=True, num_workers=workers)
            yield "a_folder", torch.utils.data.DataLoader(
                folder, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                multiprocessing_context="forkserver" if workers else None)
            yield "b_raw_shards", image_loader(raw_dir, transform=reference, **common)
            yield "b2_raw_shards_draft", image_loader(raw_dir, transform=transform, decode_size=need, **common)
            yield f"c_stored{args.store_max_side}_shards_draft", image_loader(stored_dir, transform=transform,
                                                                             decode_size=need, **common)

        for _ in range(args.repeats):
            for workers in (0, 1):
                for name, loader in loaders(workers):
                    rates.setdefault(f"{name}_w{workers}", []).append(timed_pass(loader, args.images))
                    print(f"{name} workers={workers}: {rates[f'{name}_w{workers}'][-1]:.1f} img/s", file=sys.stderr)
        disk = {"image_folder": _bytes(image_dir, "*.jpg"), "raw_shards": _bytes(raw_dir, "*.tar"),
                "stored_shards": _bytes(stored_dir, "*.tar")}
    med = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    stored_key = f"c_stored{args.store_max_side}_shards_draft"
    return {"mode": "realistic", "images": args.images, "batch_size": args.batch_size, "repeats": args.repeats,
            "transform": "open_clip ViT-B-16 eval (224, bicubic, shortest side, centre crop): open_clip's own for "
                         "a and b, the pipeline's EvalTransform (crop-box resize, fused normalise) for b2 and c",
            "source_shorter_side_px": {"min": min(sides), "median": int(statistics.median(sides)),
                                       "max": max(sides)},
            "store_max_side": args.store_max_side, "jpeg_quality": JPEG_QUALITY, "decode_size": need,
            "n_resized": stored["n_resized"], "images_per_s": med,
            "ratio_c_over_a_w0": round(med[f"{stored_key}_w0"] / med["a_folder_w0"], 2),
            "ratio_c_over_a_w1": round(med[f"{stored_key}_w1"] / med["a_folder_w1"], 2),
            "ratio_b_over_a_w0": round(med["b_raw_shards_w0"] / med["a_folder_w0"], 2),
            "bytes_on_disk": disk, "stored_over_raw_bytes": round(disk["stored_shards"] / disk["raw_shards"], 3),
            "shard_write_s": {"raw": round(raw_write_s, 2), "stored": round(stored_write_s, 2)},
            "cpu": os.cpu_count()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--realistic", action="store_true",
                    help="photo-like JPEGs at 300-1500 px; folder vs raw shards vs stored shards + draft decode")
    ap.add_argument("--store-max-side", type=int, default=256, help="stored shorter side for --realistic")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--maxcount", type=int, default=256, help="samples per shard")
    args = ap.parse_args(argv)
    if args.realistic:
        result = realistic(args)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(result))
        return result

    transform = clip_like_transform()
    shard_rates, folder_rates = [], []
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        image_dir, shard_dir = Path(tmp) / "images", Path(tmp) / "shards"
        make_tree(image_dir, args.images)
        write_domain_shards(image_dir, shard_dir, dataset="synthetic", domain="bench", classes=CLASSES,
                            maxcount=args.maxcount, seed=0)
        folder = folder_dataset(image_dir, classes=CLASSES, transform=transform)
        for _ in range(args.repeats):
            shards = image_loader(shard_dir, transform=transform, batch_size=args.batch_size, shuffle=True,
                                  with_labels=True, num_workers=args.num_workers)
            shard_rates.append(timed_pass(shards, args.images))
            files = torch.utils.data.DataLoader(folder, batch_size=args.batch_size, shuffle=True,
                                                num_workers=args.num_workers)
            folder_rates.append(timed_pass(files, args.images))
            print(f"shards {shard_rates[-1]:.0f} img/s, folder {folder_rates[-1]:.0f} img/s", file=sys.stderr)

    shards_med, folder_med = statistics.median(shard_rates), statistics.median(folder_rates)
    result = {"images": args.images, "batch_size": args.batch_size, "num_workers": args.num_workers,
              "shards_images_per_s": round(shards_med, 1), "folder_images_per_s": round(folder_med, 1),
              "ratio_shards_over_folder": round(shards_med / folder_med, 3), "repeats": args.repeats}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
