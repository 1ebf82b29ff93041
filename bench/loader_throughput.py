"""Images/s through the shard loader vs. a plain image-folder DataLoader, same images and transform.

    python -m bench.loader_throughput --images 2000 --batch-size 64 --num-workers 0 --repeats 3

Builds a synthetic 10-class tree of small random JPEGs in a temp dir, shards it, then alternates full
passes of (a) ``image_loader`` over the shards and (b) a DataLoader over ``folder_dataset`` so drift
(page cache, CPU clocks) hits both alike. Prints one JSON object (medians) to stdout.
"""
from __future__ import annotations

import argparse
import json
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--maxcount", type=int, default=256, help="samples per shard")
    args = ap.parse_args(argv)

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
