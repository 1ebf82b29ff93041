"""Export a bundle for use without this project, each format checked against the eager student.

* ``merged``: a standalone bundle: the dense base model with the method's changes folded in (CMKD's adapted
  visual tower) as an ordinary open_clip ``local-dir:`` checkpoint (``open_clip_config.json`` +
  ``open_clip_model.safetensors``: ``open_clip.create_model_and_transforms("local-dir:<folder>")`` loads it),
  plus the remaining trained parts (prompts, projector, heads, class vectors) in ``model.safetensors``, the
  config and the card. ``uda-distill predict`` runs it with no other weights.
* ``pt2``: the image path (preprocessed images -> logits) through ``torch.export`` with a dynamic batch
  dimension; load with ``torch.export.load(path).module()``. TorchScript is deprecated, hence not offered.
* ``onnx``: the same graph through ``torch.onnx.export(dynamo=True)`` (the optional ``onnx`` extra), checked
  with onnxruntime.

``pt2`` and ``onnx`` get a ``<out>.json`` beside them with the classes and the preprocessing the graph
expects. Every export runs the exported model and the eager student on the same images and fails, writing
nothing, when the largest logit difference exceeds :data:`PARITY_BOUND`.
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from pipeline.io import atomic_dir, atomic_write, atomic_write_json
from pipeline.models.factory import model_config
from pipeline.student.bundle import CARD, Bundle, Student, base_record, write_bundle

FORMATS = ("merged", "pt2", "onnx")
PARITY_BOUND = 1e-4
N_SYNTHETIC = 8


class ParityError(RuntimeError):
    """The exported model's logits differ from the eager student's by more than :data:`PARITY_BOUND`."""


@dataclasses.dataclass
class ExportReport:
    format: str
    path: Path
    max_abs_diff: float
    n_images: int
    bytes: int

    def summary(self) -> str:
        return (f"exported {self.format} to {self.path} ({self.bytes / 1e6:.2f} MB); parity on {self.n_images} "
                f"images: max |logit difference| {self.max_abs_diff:.2e} (bound {PARITY_BOUND:g})")


def parity_images(student: Student, images: list[str] | None = None, *, n: int = N_SYNTHETIC) -> torch.Tensor:
    """Preprocessed images for the parity check: the given image files/folders/lists, else ``n`` seeded
    synthetic images (noise, gradients and blocks at the model's input size)."""
    if images:
        from pipeline.student.inputs import Inputs

        batches = [b.images for b in Inputs.resolve(images).batches(transform=student.preprocess, batch_size=64)
                   if b.names]
        if not batches:
            raise ValueError(f"--images {images}: none of these images could be read")
        return torch.cat(batches)[:64]
    rng = np.random.default_rng(0)
    pictures = []
    for i in range(n):
        size = int(rng.integers(24, 320))
        array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if i % 2 else \
            np.broadcast_to(np.linspace(0, 255, size, dtype=np.uint8)[None, :, None], (size, size, 3)).copy()
        array[size // 4: size // 2, size // 4: size // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
        pictures.append(student.preprocess(Image.fromarray(array)))
    return torch.stack(pictures)


def _max_diff(expected: torch.Tensor, found: torch.Tensor | np.ndarray) -> float:
    found = torch.as_tensor(np.asarray(found)) if not isinstance(found, torch.Tensor) else found
    return float((expected.float() - found.detach().float().cpu()).abs().max())


def _checked(diff: float, what: str) -> float:
    if not diff <= PARITY_BOUND:  # also catches NaN
        raise ParityError(f"{what}: max |logit difference| to the eager student is {diff:.2e} > {PARITY_BOUND:g}; "
                          "nothing was written")
    return diff


@torch.no_grad()
def export_bundle(bundle_dir: str | Path, *, format: str, out: str | Path, base: str | None = None,
                  cache_dir: str | None = None, images: list[str] | None = None) -> ExportReport:
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    bundle = Bundle.read(bundle_dir)
    student = bundle.load(base=base, cache_dir=cache_dir)
    x = parity_images(student, images)
    expected = student.model(x)
    export = {"merged": _merged, "pt2": _pt2, "onnx": _onnx}[format]
    path, diff = export(bundle, student, x, expected, Path(out))
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return ExportReport(format, path, diff, len(x), size)


def _merged(bundle: Bundle, student: Student, x: torch.Tensor, expected: torch.Tensor, out: Path
            ) -> tuple[Path, float]:
    from safetensors.torch import save

    dense = student.base.model  # the classifier was built into it: CMKD's adapted tower is in its visual
    state = {k: v for k, v in bundle.state.items() if k not in ("visual", "residual")}
    config = {**bundle.config, "base": {**base_record(student.base), "merged": True,
                                        "merged_from": bundle.config["base"]}}
    with atomic_dir(out) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in dense.state_dict().items()}
        (tmp / "open_clip_model.safetensors").write_bytes(save(weights))  # bytes: usual file permissions
        (tmp / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": model_config(student.base.spec), "preprocess_cfg": student.base.identity["preprocess"]},
            indent=2) + "\n")
        write_bundle(tmp, config=config, state=state, card=(bundle.dir / CARD).read_text(encoding="utf-8"))
        diff = _checked(_max_diff(expected, Bundle.read(tmp).load().model(x)), "merged")
    return out, diff


def _write_checked(out: Path, student: Student, write: Callable[[Path], Any], run: Callable[[Path], Any],
                   expected: torch.Tensor, what: str) -> float:
    """Write the graph to a temporary file, run it there, and only then put it (and its sidecar) in place."""
    result = {}

    def write_and_check(tmp: Path) -> None:
        write(tmp)
        result["diff"] = _checked(_max_diff(expected, run(tmp)), what)

    atomic_write(out, write_and_check)
    atomic_write_json(out.with_name(out.name + ".json"), {
        "format": what, "input": "images [batch, 3, H, W] after the preprocessing below", "output": "logits [batch, C]",
        "classes": student.classes, "preprocess": student.base.identity["preprocess"],
        "method": student.config["method"], "task": student.config["task"], "parity_max_abs_diff": result["diff"]})
    return result["diff"]


def _batch_dim():
    # min 1 so that single images run; the example batch must be >= 2, or export specialises the size to 1
    return torch.export.Dim("batch", min=1, max=4096)


def _pt2(bundle: Bundle, student: Student, x: torch.Tensor, expected: torch.Tensor, out: Path) -> tuple[Path, float]:
    program = torch.export.export(student.model, (x,), dynamic_shapes=({0: _batch_dim()},))
    buffer = io.BytesIO()  # torch.export.load wants a buffer or a name ending in .pt2, not a temporary's name
    torch.export.save(program, buffer)
    data = buffer.getvalue()
    diff = _write_checked(out, student, lambda tmp: Path(tmp).write_bytes(data),
                          lambda _tmp: torch.export.load(io.BytesIO(data)).module()(x), expected, "pt2")
    return out, diff


def _onnx(bundle: Bundle, student: Student, x: torch.Tensor, expected: torch.Tensor, out: Path) -> tuple[Path, float]:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's dynamo exporter needs it)
    except ImportError as exc:
        raise RuntimeError(f"--format onnx needs the onnx extra ({exc.name} is missing): "
                           "pip install 'uda-distill[onnx]'") from None
    import warnings

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own treespec deprecations
            torch.onnx.export(student.model, (x,), str(tmp), dynamo=True, external_data=False, verbose=False,
                              input_names=["images"], output_names=["logits"],
                              dynamic_shapes=({0: _batch_dim()},))

    def run(tmp: Path) -> np.ndarray:
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": x.numpy().astype(np.float32)})[0]

    diff = _write_checked(out, student, write, run, expected, "onnx")
    return out, diff

