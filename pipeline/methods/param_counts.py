"""Trainable and stored parameter counts of a method's learnable parts, without weights or memory.

Models are built on PyTorch's ``meta`` device from the architecture alone (an open_clip model name, a
config shipped in ``pipeline/models/model_configs`` or a ``local-dir:`` folder's ``open_clip_config.json``),
then wrapped exactly as training wraps them. *Trainable* counts the parameters the optimiser updates;
*stored* counts every tensor element a checkpoint keeps (adds e.g. the projector's BatchNorm statistics).
"""
from __future__ import annotations

import json
from typing import Any

import torch

from pipeline.models.prompted import PromptedStudent, PromptedTeacher, own_entries

CLASS_NAMES = ["class"]  # counts do not depend on the class names, only on their number (class-specific ctx)


def meta_model(name: str) -> torch.nn.Module:
    """An open_clip model with the architecture of ``name`` on the meta device (no weights, no memory)."""
    import open_clip

    from pipeline.models import factory  # noqa: F401  (registers the shipped model configs)

    if name.startswith("local-dir:"):
        from pathlib import Path

        cfg = json.loads((Path(name[len("local-dir:"):]) / "open_clip_config.json").read_text())["model_cfg"]
        with torch.device("meta"):
            return open_clip.CLIP(**cfg)
    with torch.device("meta"):
        return open_clip.create_model(name, pretrained=None, device="meta")


def _tokenizer(name: str):
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32" if name.startswith("local-dir:") else name)


def _counts(module: torch.nn.Module, trainable: list[torch.nn.Parameter], frozen: torch.nn.Module) -> dict[str, int]:
    return {"trainable": sum(p.numel() for p in trainable),
            "stored": sum(v.numel() for v in own_entries(module, frozen).values())}


def _teacher(clip, tokenizer, n_classes: int, *, n_ctx: int, class_specific: bool, visual_tokens: int,
             location: str) -> dict[str, int]:
    template = " ".join(["X"] * n_ctx) + " {}."  # counts do not depend on the words
    with torch.device("meta"):
        t = PromptedTeacher(clip, tokenizer, CLASS_NAMES * n_classes, template=template, n_ctx=n_ctx,
                            init="random", class_specific=class_specific, visual_tokens=visual_tokens,
                            visual_location=location)
    return _counts(t, t.trainable_parameters(), clip)


def _student(clip, teacher_dim: int, d: dict[str, Any]) -> dict[str, int]:
    depth = d["depth"] or len(clip.visual.transformer.resblocks)  # 0: every layer
    with torch.device("meta"):
        s = PromptedStudent(clip.visual, teacher_dim=teacher_dim, n_tokens=d["n_tokens"], location=d["location"],
                            depth=depth)
    return _counts(s, s.trainable_parameters(), clip.visual)


def method_parameter_counts(params: dict[str, Any], *, n_classes: int = 10) -> list[dict[str, Any]]:
    """Rows ``{part, model, trainable, stored}`` for ``params["distill"]["method"]`` and its models."""
    from pipeline.methods.dapl import DaplPrompts

    method, d, pr = params["distill"]["method"], params["distill"], params["prompts"]
    t_name, s_name = params["model"]["teacher"]["name"], params["model"]["student"]["name"]
    teacher = meta_model(t_name)
    teacher_dim = teacher.text_projection.shape[-1]
    rows = []
    if method == "promptkd":
        rows.append({"part": "teacher source prompts (prompts stage)", "model": t_name, **_teacher(
            teacher, _tokenizer(t_name), n_classes, n_ctx=pr["n_ctx"], class_specific=pr["class_specific"],
            visual_tokens=pr["visual_tokens"], location=pr["visual_location"])})
    if method == "ekda":
        e = d["ekda"]
        rows.append({"part": "teacher prompts (text + visual, middle)", "model": t_name, **_teacher(
            teacher, _tokenizer(t_name), n_classes, n_ctx=e["n_ctx"], class_specific=False,
            visual_tokens=e["visual_tokens"], location="middle")})
    if method in ("promptkd", "ekda"):
        rows.append({"part": "student (visual prompts + projector)", "model": s_name,
                     **_student(meta_model(s_name), teacher_dim, d[method])})
    if method == "dapl":
        a = d["dapl"]
        with torch.device("meta"):
            prompts = DaplPrompts(teacher, _tokenizer(t_name), CLASS_NAMES * n_classes, ["source", "target"],
                                  n_ctx=a["n_ctx"], n_domain_ctx=a["n_domain_ctx"],
                                  class_specific=a["class_specific"])
        rows.append({"part": "domain-agnostic + 2 domain-specific contexts", "model": t_name,
                     **_counts(prompts, prompts.trainable_parameters(), teacher)})
    return rows
