"""Trainable and stored parameter counts of a method's learnable parts, without weights or memory.

Models are built on PyTorch's ``meta`` device from the architecture alone (an open_clip model name, a
config shipped in ``pipeline/models/model_configs`` or a ``local-dir:`` folder's ``open_clip_config.json``),
then wrapped by the same construction code training uses (each method's ``parameter_counts``).
*Trainable* counts the parameters the optimiser updates; *stored* counts every tensor element a checkpoint
keeps (adds e.g. the projector's BatchNorm statistics).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.models.prompted import own_entries

CLASS_NAMES = ["class"]  # counts do not depend on the class names, only on their number (class-specific ctx)


def meta_model(name: str) -> torch.nn.Module:
    """An open_clip model with the architecture of ``name`` on the meta device (no weights, no memory)."""
    import open_clip

    from pipeline.models import factory  # noqa: F401  (registers the shipped model configs)

    if name.startswith(factory.LOCAL_DIR):
        cfg = json.loads((Path(name[len(factory.LOCAL_DIR):]) / "open_clip_config.json").read_text())["model_cfg"]
        with torch.device("meta"):
            return open_clip.CLIP(**cfg)
    with torch.device("meta"):
        return open_clip.create_model(name, pretrained=None, device="meta")


def meta_tokenizer(name: str):
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32" if name.startswith("local-dir:") else name)


def count(module: torch.nn.Module, trainable: list[torch.nn.Parameter], frozen: torch.nn.Module) -> dict[str, int]:
    """``{trainable, stored}`` of ``module``: its optimised parameters, and its state outside ``frozen``."""
    return {"trainable": sum(p.numel() for p in trainable),
            "stored": sum(v.numel() for v in own_entries(module, frozen).values())}


def teacher_prompt_counts(params: dict[str, Any], n_classes: int, architecture: dict[str, Any]) -> dict[str, int]:
    """Counts of the prompted teacher that ``architecture`` (:class:`PromptedTeacher` keywords) describes."""
    from pipeline.methods.shared import make_teacher

    name = params["model"]["teacher"]["name"]
    clip = meta_model(name)
    architecture = {**architecture, "template": " ".join(["X"] * architecture["n_ctx"]) + " {}."}  # words don't count
    with torch.device("meta"):
        teacher = make_teacher(clip, meta_tokenizer(name), CLASS_NAMES * n_classes, architecture)
    return count(teacher, teacher.trainable_parameters(), clip)


def source_prompt_row(params: dict[str, Any], n_classes: int) -> dict[str, Any]:
    """The prompts stage's teacher (source prompts), as a row."""
    from pipeline.methods.prompt_kinds import teacher_architecture

    kind = params["prompts"]["kind"]
    return {"part": f"teacher source prompts ({kind}, prompts stage)", "model": params["model"]["teacher"]["name"],
            **teacher_prompt_counts(params, n_classes, teacher_architecture(params["prompts"]))}


def method_parameter_counts(params: dict[str, Any], *, n_classes: int = 10) -> list[dict[str, Any]]:
    """Rows ``{part, model, trainable, stored}`` for ``params["distill"]["method"]`` and its models."""
    from pipeline.methods import METHODS

    return METHODS[params["distill"]["method"]].parameter_counts(params, n_classes)
