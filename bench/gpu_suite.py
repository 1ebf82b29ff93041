"""Every measurement only a GPU can give, in one run (< 8 min on one H200); one JSON object.

    python -m bench.gpu_suite                        # CUDA when present: ViT-B/16 + ViT-L/14, real shapes
    python -m bench.gpu_suite --device cpu           # tiny stand-ins in seconds (CI keeps the script working)

Sections:
  caching    teacher-feature caching images/s per teacher: the real path (:func:`encode_shards` on photo-like
             JPEG shards, CPU decode with loader workers, and on CUDA the nvJPEG decoder) vs the same model
             on device-resident tensors, same batch; share of stage time outside the model (goal < 20 %);
             on CUDA the model's rate against the FLOP bound (``--peak-tflops``, dense bf16).
  ekda       one EKDA iteration (teacher -> student) and one two-stage (PromptKD) student step: step time and
             peak memory (:mod:`bench.ekda_iteration`).
  precision  student step time in fp32 / bf16 / fp16 autocast.
  faiss      index build + search, faiss-cpu vs faiss-gpu (skipped without a GPU build and a GPU).
Weights are random (architecture from open_clip's configs; nothing is downloaded).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import pipeline  # noqa: F401  (torchvision guard)
import torch

from bench import ekda_iteration
from bench.features_throughput import caching_rates
from bench.shard_throughput import CLASSES, make_tree
from pipeline.data.shards import resolve_num_workers, write_domain_shards
from pipeline.features.cache import build_index, faiss_uses_gpu
from pipeline.models.factory import ModelSpec, load_model

# Forward GFLOP per image at 224 px (open_clip's profile): the FLOP bound of the caching rate.
GFLOP = {"ViT-B-16-quickgelu": 17.6, "ViT-B-16": 17.6, "ViT-L-14-quickgelu": 81.1, "ViT-L-14": 81.1}
FULL = {"teachers": ["ViT-B-16-quickgelu", "ViT-L-14-quickgelu"], "student": "ViT-B-16-quickgelu",
        "images": 2048, "image_size": 400, "store_max_side": 256, "batch_size": 128, "faiss_n": 100_000,
        "faiss_dim": 768, "repeats": 3}
TINY = {"teachers": ["digits-vit-teacher"], "student": "digits-vit-student", "images": 128, "image_size": 48,
        "store_max_side": 40, "batch_size": 32, "faiss_n": 4000, "faiss_dim": 64, "repeats": 1}


def photo_shards(root: Path, n: int, size: int, store_max_side: int | None) -> Path:
    """``n`` photo-like JPEGs (gradients + noise) of ``size`` px written as shards by the real writer,
    stored at ``store_max_side`` as the benchmark configs do (256)."""
    make_tree(root / "raw", n, size)
    write_domain_shards(root / "raw", root / "shards", dataset="bench", domain="photos", classes=CLASSES,
                        maxcount=500, seed=0, store_max_side=store_max_side)
    return root / "shards"


def caching(cfg: dict, args, shard_dir: Path) -> dict:
    out = {}
    cuda = args.device.startswith("cuda")
    for name in cfg["teachers"]:
        torch.manual_seed(0)
        model = load_model(ModelSpec(name=name, pretrained="random", precision=args.precision), device=args.device)
        row = {"cpu_decode": caching_rates(model, shard_dir, batch_size=cfg["batch_size"], device=args.device,
                                           precision=args.precision, num_workers=args.workers,
                                           repeats=cfg["repeats"])}
        row["cpu_decode"]["num_workers"] = args.workers
        row["gpu_decode"] = (caching_rates(model, shard_dir, batch_size=cfg["batch_size"], device=args.device,
                                           precision=args.precision, num_workers=0, repeats=cfg["repeats"],
                                           decode="gpu") if cuda else {"skipped": "no CUDA device"})
        if name in GFLOP:
            bound = args.peak_tflops * 1e12 / (GFLOP[name] * 1e9)
            row["flop_bound_images_per_s"] = round(bound, 1)
            row["model_share_of_flop_bound"] = round(row["cpu_decode"]["model_images_per_s"] / bound, 3)
        out[name] = row
        del model
    return out


def ekda(cfg: dict, args) -> dict:
    precision = args.precision if args.device.startswith("cuda") else "fp32"
    return ekda_iteration.main(["--teacher", cfg["teachers"][-1], "--student", cfg["student"],
                                "--batch-size", str(args.step_batch), "--precision", precision,
                                "--repeats", str(cfg["repeats"]), "--device", args.device])


def precision_steps(cfg: dict, args) -> dict:
    out = {}
    for precision in ("fp32", "bf16", "fp16"):
        try:
            r = ekda_iteration.main(["--teacher", cfg["teachers"][-1], "--student", cfg["student"],
                                     "--batch-size", str(args.step_batch), "--precision", precision,
                                     "--repeats", str(cfg["repeats"]), "--device", args.device])
        except RuntimeError as exc:  # e.g. fp16 autocast unsupported by this device's build
            out[precision] = {"skipped": str(exc)[:200]}
            continue
        out[precision] = {"student_step_s": r["student_step_s"], "two_stage_step_s": r["two_stage_step_s"]}
    return out


def _time(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


def faiss_section(cfg: dict, args) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((cfg["faiss_n"], cfg["faiss_dim"]), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[: min(10_000, len(x))]
    out = {"n": len(x), "dim": x.shape[1], "queries": len(queries), "k": 10}
    for where, device in (("cpu", "cpu"), ("gpu", args.device)):
        if where == "gpu" and not faiss_uses_gpu(device):
            out[where] = {"skipped": "faiss without GPU support or no CUDA device"}
            continue
        build_s, (index, meta) = _time(lambda: build_index(x, device=device))
        search_s, _ = _time(lambda: index.search(queries, 10))
        out[where] = {"built_on": meta["built_on"], "build_s": round(build_s, 4), "search_s": round(search_s, 4),
                      "queries_per_s": round(len(queries) / search_s, 1)}
    if "build_s" in out["gpu"]:
        out["search_speedup_gpu_over_cpu"] = round(out["cpu"]["search_s"] / out["gpu"]["search_s"], 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"],
                        help="caching precision (autocast); CPU runs use fp32")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200: 989)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers for CPU decode")
    parser.add_argument("--step-batch", type=int, default=None, help="batch of the EKDA / student steps")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_suite.json"))
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    cfg = FULL if cuda else TINY
    if not cuda:
        args.precision = "fp32"
    # the pipeline's runtime.num_workers: auto on a GPU machine; none for the seconds-long CPU run
    args.workers = args.workers if args.workers is not None else (resolve_num_workers("auto") if cuda else 0)
    args.step_batch = args.step_batch or (32 if cuda else 8)
    result = {"device": torch.cuda.get_device_name(args.device) if cuda else "cpu", "precision": args.precision,
              "peak_tflops": args.peak_tflops, "config": cfg}
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = photo_shards(Path(tmp), cfg["images"], cfg["image_size"], cfg["store_max_side"])
        result["caching"] = caching(cfg, args, shard_dir)
    result["ekda"] = ekda(cfg, args)
    result["precision_steps"] = precision_steps(cfg, args)
    result["faiss"] = faiss_section(cfg, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
