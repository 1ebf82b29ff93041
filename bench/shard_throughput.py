"""Sharding throughput (images/s): the shard writer with 1 worker vs N workers, side by side.

    python -m bench.shard_throughput --images 6000 --size 160 --workers 1 2 --repeats 3

Generates a synthetic Office-like class-per-folder tree of ``--images`` JPEGs (smooth gradients plus
noise, so they compress like photos rather than like pure noise) in a temp dir, then alternates full
shard writes with each worker count so drift (page cache, clocks) hits all alike. Every write goes
through the real path: listing, header + PIL check of every file, raw-bytes tar writing, manifest. The
outputs are checked byte-identical across worker counts. Prints one JSON object (medians) to stdout.
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
from PIL import Image

from pipeline.data.shards import write_domain_shards

CLASSES = [f"class_{i:02d}" for i in range(31)]


def make_tree(root: Path, n: int, size: int, seed: int = 0) -> int:
    """``n`` JPEGs of ``size`` x ``size`` spread over 31 class folders; returns the total bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    total = 0
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    for i in range(n):
        a, b, c = rng.uniform(0, 255, size=3)
        base = np.stack([a * xx + (255 - a) * yy, b * yy, c * (1 - xx)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        path = root / CLASSES[i % len(CLASSES)] / f"frame_{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        total += path.stat().st_size
    return total


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def cpu_scaling_probe(processes: int, n: int = 5_000_000) -> float:
    """Speed-up of ``processes`` processes over one on pure-Python work: what parallel sharding can hope
    for on this machine (shared or throttled vCPUs give about 1.0)."""
    import multiprocessing

    t0 = time.perf_counter()
    for _ in range(processes):
        _spin(n)
    serial = time.perf_counter() - t0
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_spin, [1000] * processes)  # start-up excluded
        t0 = time.perf_counter()
        pool.map(_spin, [n] * processes)
        parallel = time.perf_counter() - t0
    return serial / parallel


def _digest(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--size", type=int, default=160, help="image side in pixels")
    parser.add_argument("--maxcount", type=int, default=500, help="samples per shard")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="shard-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        nbytes = make_tree(tmp / "tree", args.images, args.size)
        print(f"generated {args.images} JPEGs ({nbytes / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        rates: dict[int, list[float]] = {w: [] for w in args.workers}
        for r in range(args.repeats):
            for w in args.workers:
                out = tmp / f"out_w{w}"
                t0 = time.perf_counter()
                m = write_domain_shards(tmp / "tree", out, dataset="bench", domain="d", classes=CLASSES,
                                        maxcount=args.maxcount, seed=0, workers=w)
                elapsed = time.perf_counter() - t0
                assert m["n"] == args.images
                rates[w].append(args.images / elapsed)
        digests = {w: _digest(tmp / f"out_w{w}") for w in args.workers}
        identical = all(d == digests[args.workers[0]] for d in digests.values())

    med = {w: statistics.median(v) for w, v in rates.items()}
    probe = cpu_scaling_probe(max(args.workers)) if max(args.workers) > 1 else 1.0
    base = med[args.workers[0]]
    result = {"images": args.images, "image_side_px": args.size, "tree_mb": round(nbytes / 1e6, 1),
              "maxcount": args.maxcount, "cpu_cores": os.cpu_count(), "repeats": args.repeats,
              "images_per_s": {str(w): round(v, 1) for w, v in med.items()},
              "mb_per_s": {str(w): round(v * nbytes / args.images / 1e6, 1) for w, v in med.items()},
              "speedup_vs_first": {str(w): round(v / base, 2) for w, v in med.items()},
              "all_runs_images_per_s": {str(w): [round(x, 1) for x in v] for w, v in rates.items()},
              "byte_identical_across_worker_counts": identical,
              f"cpu_scaling_probe_{max(args.workers)}_processes": round(probe, 2)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
