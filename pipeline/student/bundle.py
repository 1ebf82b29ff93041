"""The student bundle: one trained task as a self-contained, pickle-free folder, and its loading for inference.

A bundle (written by the ``bundle`` stage, one per task, ``paths.bundles/<task>/``) holds::

    model.safetensors   only what training changed (prompts, projector, heads, class vectors; CMKD the
                        visual weights, or with RST the sparse residual), nested names joined by "/"
    config.json         method, base model identity and weights hash, classes, preprocessing, params,
                        code revision, metrics (see :func:`bundle_config`)
    README.md           the model card (:mod:`pipeline.student.card`)

It runs on a frozen base model found by the same spec rules as the stages (a pretrained tag in the
open_clip cache, a local weights file, ``local-dir:``) and refuses any base other than the one it was
trained on (compared by identity and a sha256 of the base's visual weights). A *merged* bundle
(:func:`pipeline.student.export.export_merged`) also carries its dense base as an open_clip ``local-dir:``
checkpoint in the same folder and needs nothing else.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from pipeline.artifacts import distill_seeds
from pipeline.io import atomic_write, atomic_write_json, read_json
from pipeline.models.factory import LoadedModel, ModelSpec, ModelWeightsError, load_model
from pipeline.models.residual import visual_weights_hash

FORMAT = "uda-distill/student-bundle-v1"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
SEP = "/"  # joins nesting levels in model.safetensors (state-dict names already use ".")
MATCHED = ("weights_sha256", "quick_gelu", "preprocess", "embed_dim")  # what a base must share with the bundle's


class BundleError(ValueError):
    """A bundle folder that cannot be read or used (missing or damaged file, other format, wrong base)."""


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """``{"student": {"encoder.prompts": t}}`` -> ``{"student/encoder.prompts": t}`` (contiguous CPU copies)."""
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}{SEP}"))
        else:
            flat[name] = torch.as_tensor(value).detach().cpu().contiguous().clone()
    return flat


def unflatten(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, tensor in flat.items():
        *parents, leaf = name.split(SEP)
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    return nested


def base_record(model: LoadedModel) -> dict[str, Any]:
    """The base model as config.json records it: identity, role, and the sha256 of its visual weights."""
    from open_clip.pretrained import get_pretrained_cfg

    spec = model.spec
    hub = None if spec.is_local_dir else (get_pretrained_cfg(spec.name, spec.pretrained or "") or {}).get("hf_hub")
    return {**model.identity, "role": spec.role, "hf_hub": hub.rstrip("/") if hub else None,
            "weights_sha256": visual_weights_hash(model.model.visual.state_dict())}


def describe_base(record: dict[str, Any]) -> str:
    where = f", pretrained {record['pretrained']!r}" if record.get("pretrained") else ""
    return (f"{record['name']!r}{where} (QuickGELU {record.get('quick_gelu')}, visual weights sha256 "
            f"{str(record.get('weights_sha256'))[:12]})")


def write_bundle(folder: Path, *, config: dict[str, Any], state: dict[str, Any], card: str) -> None:
    """Write the three files into ``folder`` (a stage's temporary folder: atomic as a whole)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = flatten(state)
    data = save(tensors, metadata={"format": FORMAT})  # bytes: the file keeps the temporary's permissions
    atomic_write(folder / WEIGHTS, lambda tmp: Path(tmp).write_bytes(data))
    atomic_write_json(folder / CONFIG, config)
    atomic_write(folder / CARD, lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))


def code_revision() -> str:
    """The git commit of the code that wrote the bundle (``+dirty`` with uncommitted changes), or ``unknown``."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


CHECKPOINT_KEYS = ("method", "state", "classes", "logit_scale", "class_vectors", "models", "cached_teacher",
                   "distill", "task", "seed")  # what every student.pt holds; the rest is the method's own (method_config)


def bundle_config(*, name: str, checkpoint: dict[str, Any], base: LoadedModel, params: dict[str, Any],
                  evaluation: dict[str, Any]) -> dict[str, Any]:
    """config.json of a task's bundle, from the distill stage's ``student.pt``, the base model it runs on, the
    params and the evaluate stage's ``metrics.json`` (reported: last epoch; the best epoch is an oracle)."""
    target = evaluation["models"]["student"]["target"]
    epochs = len(target["per_epoch"])
    metrics = {"last": {"epoch": epochs, **{k: target["last"][k] for k in ("acc", "mean_class_acc", "n")}},
               "best_oracle": {"epoch": target["best_epoch"],
                               **{k: target["best"][k] for k in ("acc", "mean_class_acc", "n")}},
               "headline": evaluation["headline"], "protocol": evaluation["protocol"]}
    runs = evaluation["models"]["student"].get("seeds") or {}
    if len(runs) > 1:  # the spread the shipped (first-seed) run comes from
        metrics["over_seeds"] = {"seeds": [int(seed) for seed in runs],
                                 **{k: [runs[seed][k] for seed in runs] for k in ("acc", "mean_class_acc")}}
    return {"format": FORMAT, "method": checkpoint["method"], "task": {"name": name, **checkpoint["task"]},
            "classes": list(checkpoint["classes"]), "logit_scale": float(checkpoint["logit_scale"]),
            "base": base_record(base), "models": checkpoint["models"],
            "method_config": {k: v for k, v in checkpoint.items() if k not in CHECKPOINT_KEYS},
            "params": {"distill": checkpoint["distill"], "model": params["model"], "seed": distill_seeds(params)[0]},
            "code_revision": code_revision(), "metrics": metrics}


def bundle_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The tensors a bundle stores: the checkpoint's trained state and the class vectors inference uses."""
    state = dict(checkpoint["state"])
    if checkpoint.get("class_vectors") is not None:
        state["class_vectors"] = checkpoint["class_vectors"]
    return state


@dataclasses.dataclass
class Student:
    """A loaded bundle: ``model`` maps preprocessed images [B, 3, H, W] to logits [B, C] (eval mode)."""

    model: torch.nn.Module
    preprocess: Any
    classes: list[str]
    config: dict[str, Any]
    base: LoadedModel


@dataclasses.dataclass
class Bundle:
    dir: Path
    config: dict[str, Any]
    state: dict[str, Any]

    @classmethod
    def read(cls, folder: str | Path) -> "Bundle":
        folder = Path(folder)
        if not folder.is_dir():
            raise BundleError(f"bundle {folder}: no such folder; a bundle is written per task by the bundle stage "
                              f"(`dvc repro`), under paths.bundles/<task>")
        missing = [n for n in (WEIGHTS, CONFIG) if not (folder / n).is_file()]
        if missing:
            raise BundleError(f"bundle {folder}: {' and '.join(missing)} missing; restore it with `dvc checkout` "
                              f"or re-create it with `dvc repro`")
        try:
            config = read_json(folder / CONFIG)
            state = unflatten(load_file(str(folder / WEIGHTS)))
        except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as exc:
            raise BundleError(f"bundle {folder}: damaged file ({type(exc).__name__}: {str(exc)[:160]}); restore it "
                              f"with `dvc checkout` or re-create it with `dvc repro`") from None
        if config.get("format") != FORMAT:
            raise BundleError(f"bundle {folder}: format {config.get('format')!r}, expected {FORMAT!r}")
        return cls(folder, config, state)

    def base_spec(self, base: str | None = None, cache_dir: str | None = None) -> ModelSpec:
        """Where the base weights come from: the recorded spec, the merged bundle itself, or ``base``
        (``local-dir:<folder>``, a weights file, or a pretrained tag of the recorded architecture)."""
        record = self.config["base"]
        spec = dict(name=record["name"], pretrained=record.get("pretrained"), precision=record["precision"],
                    cache_dir=cache_dir, role=record["role"])
        if record.get("merged"):
            spec.update(name=f"local-dir:{self.dir}", pretrained=None)
        if base:
            local = base.startswith("local-dir:")
            spec.update(name=base if local else spec["name"], pretrained=None if local else base)
            if not local and spec["name"].startswith("local-dir:"):
                raise BundleError(f"--base {base!r}: this bundle's base is a local-dir: model; pass "
                                  f"--base local-dir:<folder with open_clip_config.json>")
        return ModelSpec(**spec)

    def load(self, *, base: str | None = None, cache_dir: str | None = None, device: str = "cpu") -> Student:
        """Load the base model (see :meth:`base_spec`) and rebuild the trained model on it."""
        try:
            model = load_model(self.base_spec(base, cache_dir), device="cpu")
        except ModelWeightsError as exc:
            raise ModelWeightsError(f"bundle {self.dir}: base weights not found: {exc}. For this command pass "
                                    f"--base (local-dir:<folder>, a weights file or a tag) or --cache-dir") from None
        return self.load_onto(model, device=device)

    def load_onto(self, base: LoadedModel, *, device: str = "cpu") -> Student:
        """Rebuild the trained model on an already loaded ``base`` (checked to be the bundle's base)."""
        from pipeline.methods import METHODS  # the method registry imports every method's training code

        self.check_base(base)
        model = METHODS[self.config["method"]].classifier(self.state, self.config, base).to(device).eval()
        return Student(model=model, preprocess=base.preprocess, classes=self.config["classes"], config=self.config,
                       base=base)

    def check_base(self, base: LoadedModel) -> None:
        recorded, found = self.config["base"], base_record(base)
        differ = [k for k in MATCHED if recorded.get(k) != found.get(k)]
        if differ:
            raise BundleError(f"bundle {self.dir} was trained on {describe_base(recorded)}, but the base model "
                              f"given is {describe_base(found)}; they differ in {', '.join(differ)}. Point --base "
                              f"to the weights the bundle was trained on")
