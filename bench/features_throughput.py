"""Features-stage throughput: images/s through :func:`encode_shards` vs the same model on pre-decoded tensors.

    python -m bench.features_throughput                      # smoke teacher stand-in, usps-like 32-px shards
    python -m bench.features_throughput --profile 20         # also the top cProfile entries of one stage pass

Same model, batch and precision on both sides; the share of stage time spent outside the model (reading
tars, checking keys, decoding, transforming, collating, copying) is ``1 - stage / model`` time. Variants
alternate for ``--repeats`` rounds (medians). Prints one JSON object and writes it to ``--out``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import tempfile
from pathlib import Path

import pipeline  # noqa: F401  (torchvision guard)
import torch

from bench.timing import median_times
from pipeline.data.shards import shard_keys
from pipeline.features.cache import encode_shards
from pipeline.models.factory import LoadedModel, ModelSpec, autocast, load_model


def usps_like_shards(root: Path, per_class: int) -> Path:
    """Synthetic usps-like digits (32 px) written as shards through the real writer."""
    from pipeline.data.classlists import load_classlist
    from pipeline.data.digits import build_domain
    from pipeline.data.shards import write_domain_shards

    build_domain("usps", root / "raw", per_class=per_class, image_size=32, seed=0)
    write_domain_shards(root / "raw", root / "shards", dataset="digits", domain="usps",
                        classes=load_classlist("digits"), maxcount=1000, seed=0)
    return root / "shards"


def caching_rates(model: LoadedModel, shard_dir: Path, *, batch_size: int, device: str, precision: str,
                  num_workers: int, repeats: int, decode: str = "cpu") -> dict:
    """Images/s of the stage path and of the model alone on device-resident tensors, same batch."""
    n = len(shard_keys(shard_dir))
    size = model.identity["preprocess"]["size"]
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    x = torch.randn(batch_size, 3, *size, device=device)
    full, rest = divmod(n, batch_size)

    def stage():
        encode_shards(model.model.encode_image, shard_dir, transform=model.preprocess, batch_size=batch_size,
                      device=device, precision=precision, num_workers=num_workers, decode=decode,
                      preprocess=model.identity["preprocess"])

    @torch.no_grad()
    def model_only():  # the same number of images and batches as the stage, no input pipeline
        for _ in range(full):
            with autocast(precision, device):
                model.model.encode_image(x)
        if rest:
            with autocast(precision, device):
                model.model.encode_image(x[:rest])

    med, _ = median_times({"stage": stage, "model": model_only}, repeats=repeats, device=device)
    return {"images": n, "stage_images_per_s": round(n / med["stage"], 1),
            "model_images_per_s": round(n / med["model"], 1),
            "ratio_model_over_stage": round(med["stage"] / med["model"], 2),
            "share_outside_model": round(1 - med["model"] / med["stage"], 3)}


def profile_stage(model: LoadedModel, shard_dir: Path, *, batch_size: int, precision: str, top: int) -> list[str]:
    """The ``top`` entries (by own time) of one CPU stage pass with no workers."""
    prof = cProfile.Profile()
    prof.enable()
    encode_shards(model.model.encode_image, shard_dir, transform=model.preprocess, batch_size=batch_size,
                  device="cpu", precision=precision)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return [line for line in out.getvalue().splitlines() if line.strip()][-top - 1:]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-vit-teacher")
    parser.add_argument("--per-class", type=int, default=200, help="images per class (10 classes)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, help="print the top N cProfile entries")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "features_throughput.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = load_model(ModelSpec(name=args.model, pretrained="random"), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = usps_like_shards(Path(tmp), args.per_class)
        result = {"model": args.model, "batch_size": args.batch_size, "precision": args.precision,
                  "threads": torch.get_num_threads(), "repeats": args.repeats,
                  "by_workers": {str(w): caching_rates(model, shard_dir, batch_size=args.batch_size, device="cpu",
                                                       precision=args.precision, num_workers=w,
                                                       repeats=args.repeats) for w in args.workers}}
        if args.profile:
            for line in profile_stage(model, shard_dir, batch_size=args.batch_size, precision=args.precision,
                                      top=args.profile):
                print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
