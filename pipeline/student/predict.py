"""``uda-distill predict``: run a bundle on the user's images; one output row per image.

Rows hold the top-k classes with their probabilities; an image that cannot be read gets a row with its
reason instead (it is never fatal), and the summary counts them. The output (CSV, or JSON by suffix) is
written atomically once all images are done; without ``--out`` CSV goes to standard output.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.io import atomic_write
from pipeline.progress import progress
from pipeline.student.bundle import Bundle
from pipeline.student.inputs import Inputs

OUTPUT_SUFFIXES = (".csv", ".json")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda or cuda:<index>") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA device is visible here; use --device cpu")
    return device


@torch.no_grad()
def predict(bundle_dir: str | Path, inputs: list[str], *, top_k: int = 1, batch_size: int = 64,
            device: str = "auto", base: str | None = None, cache_dir: str | None = None, num_workers: int = 0
            ) -> list[dict[str, Any]]:
    """Rows ``{input, predictions: [{class, probability}] (top-k, best first), error}`` in input order per batch."""
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"--top-k and --batch-size must be at least 1 (got {top_k}, {batch_size})")
    device = resolve_device(device)
    bundle = Bundle.read(bundle_dir)
    items = Inputs.resolve(inputs)  # bad arguments fail before the base model is loaded
    student = bundle.load(base=base, cache_dir=cache_dir, device=device)
    classes, k = student.classes, min(top_k, len(student.classes))
    rows: list[dict[str, Any]] = []
    batches = items.batches(transform=student.preprocess, batch_size=batch_size, num_workers=num_workers)
    for batch in progress(batches, total=math.ceil(len(items) / batch_size), desc="predict", unit="batch"):
        rows.extend({"input": f.name, "predictions": [], "error": f.reason} for f in batch.failures)
        if not batch.names:
            continue
        probs = student.model(batch.images.to(device)).float().softmax(dim=-1).cpu()
        top_p, top_i = probs.topk(k, dim=-1)
        for name, p, i in zip(batch.names, top_p.tolist(), top_i.tolist()):
            rows.append({"input": name, "error": None,
                         "predictions": [{"class": classes[c], "probability": q} for c, q in zip(i, p)]})
    return rows


def render(rows: list[dict[str, Any]], fmt: str, top_k: int) -> str:
    if fmt == ".json":
        return json.dumps(rows, indent=1) + "\n"
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["input", *[f"{col}{j}" for j in range(1, top_k + 1) for col in ("class", "probability")],
                     "error"])
    for row in rows:
        cells = [c for p in row["predictions"] for c in (p["class"], f"{p['probability']:.6f}")]
        writer.writerow([row["input"], *cells, *[""] * (2 * top_k - len(cells)), row["error"] or ""])
    return out.getvalue()


def write_rows(rows: list[dict[str, Any]], out: str | Path | None, top_k: int) -> None:
    if out is None:
        sys.stdout.write(render(rows, ".csv", top_k))
        return
    out = Path(out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {out}: expected a .csv or .json file")
    text = render(rows, out.suffix, top_k)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def summary(rows: list[dict[str, Any]], out: str | Path | None) -> str:
    failed = [r for r in rows if r["error"]]
    where = f" (listed in {out})" if out else ""
    line = f"predicted {len(rows) - len(failed)} images" + (f"; {len(failed)} unreadable, skipped{where}"
                                                            if failed else "")
    return line + "".join(f"\n  {r['input']}: {r['error']}" for r in failed[:5]) + \
        (f"\n  ... and {len(failed) - 5} more" if len(failed) > 5 else "")
