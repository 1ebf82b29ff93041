"""The teacher's source-prompt variants, chosen by ``prompts.kind``; each owns a params block ``prompts.<kind>``.

A kind maps its block (defaults: the originals' ViT-B/16 settings) to the keywords of
:class:`pipeline.models.teacher_prompts.PromptedTeacher`; ``prompts.template`` and ``prompts.init`` are
shared. A block may also hold its own ``lr``, ``epochs`` and ``batch_size`` (the benchmark configs set the
PDA repository's per-method values); absent, ``prompts.lr`` etc. apply. The prompts stage trains the kind on the labelled source (:mod:`pipeline.methods.source_prompts`),
the features stage rebuilds it from the stored keywords, and ``uda-distill info`` counts it with the same
construction code.

Sources: CoOp and CoCoOp (``KaiyangZhou/CoOp``), VPT (``KMnP/vpt``), IVLP and MaPLe
(``muzairkhattak/multimodal-prompt-learning``), PromptSRC (``muzairkhattak/PromptSRC``); the UDA settings
of the PDA repository (``BaiShuanghao/Prompt-based-Distribution-Alignment``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from pipeline.models.prompted import LOCATIONS
from pipeline.schema import Block, Field, boolean, integer, number, text

TRAINING = ("lr", "epochs", "batch_size")


def _or_null(field: Field) -> Field:
    return Field(lambda v: None if v is None else field.check(v), optional=True, default=None)


def _block(fields: dict[str, Field]) -> Block:
    """A kind's params block: its architecture keys plus training overrides (null: the shared value)."""
    return Block({**fields, "lr": _or_null(number(0.0, exclusive_min=True)), "epochs": _or_null(integer(1)),
                  "batch_size": _or_null(integer(1))})


@dataclasses.dataclass(frozen=True)
class PromptKind:
    name: str
    summary: str
    params: Block
    architecture: Callable[[dict[str, Any]], dict[str, Any]]  # block -> PromptedTeacher keywords


def _deep(block: dict[str, Any], location: str = "append") -> dict[str, Any]:
    """Independent text and visual prompts in layers 1..depth of both towers (IVLP, PromptSRC)."""
    return {"n_ctx": block["n_ctx"], "text_depth": block["depth"], "visual_tokens": block["n_tokens"],
            "visual_location": block.get("location", location), "visual_depth": block["depth"]}


KINDS: dict[str, PromptKind] = {kind.name: kind for kind in (
    PromptKind("coop", "learnable text context (CoOp)",
               _block({"n_ctx": integer(1, default=16), "class_specific": boolean(default=False)}),
               lambda b: {"n_ctx": b["n_ctx"], "class_specific": b["class_specific"]}),
    PromptKind("cocoop", "text context shifted per image by a meta-net 512-32-512 (CoCoOp)",
               _block({"n_ctx": integer(1, default=4)}),
               lambda b: {"n_ctx": b["n_ctx"], "meta_net": True}),
    PromptKind("vpt", "visual prompt tokens after the class token (VPT; depth > 1: VPT-deep)",
               _block({"n_tokens": integer(1, default=10), "location": text(LOCATIONS, default="middle"),
                      "depth": integer(0, default=1)}),
               lambda b: {"n_ctx": 0, "visual_tokens": b["n_tokens"], "visual_location": b["location"],
                          "visual_depth": b["depth"]}),
    PromptKind("ivlp", "independent deep text and visual prompts (IVLP)",
               _block({"n_ctx": integer(1, default=2), "n_tokens": integer(1, default=2),
                      "depth": integer(0, default=9), "location": text(LOCATIONS, default="append")}),
               _deep),
    PromptKind("maple", "deep text prompts; visual prompts are per-layer projections of them (MaPLe)",
               _block({"n_ctx": integer(1, default=2), "depth": integer(1, default=9)}),
               lambda b: {"n_ctx": b["n_ctx"], "text_depth": b["depth"], "visual_location": "append",
                          "visual_depth": b["depth"], "coupled_depth": b["depth"]}),
    PromptKind("promptsrc", "IVLP 4 + 4, depth 9, trained with the SCL regularisers (PromptSRC)",
               _block({"n_ctx": integer(1, default=4), "n_tokens": integer(1, default=4),
                      "depth": integer(0, default=9)}),
               _deep),
)}
SCL_KEYS = ("text_weight", "image_weight", "kl_weight")


def teacher_architecture(prompts: dict[str, Any]) -> dict[str, Any]:
    """The :class:`PromptedTeacher` keywords of the ``prompts`` params (its kind's block, template, init)."""
    kind = KINDS[prompts["kind"]]
    return {"template": prompts["template"], "init": prompts["init"], **kind.architecture(prompts[kind.name])}


def training_settings(prompts: dict[str, Any]) -> dict[str, Any]:
    """``lr``, ``epochs`` and ``batch_size`` of the prompts stage: the kind's own when its block sets them."""
    block = prompts[prompts["kind"]]
    return {key: prompts[key] if block[key] is None else block[key] for key in TRAINING}


def check(prompts: dict[str, Any], errors: list[str]) -> None:
    """Cross-key problems of the ``prompts`` block (the schema checks each key alone)."""
    if prompts["kind"] == "promptsrc" and not any(prompts[k] for k in SCL_KEYS):
        errors.append("prompts.kind: promptsrc is IVLP plus its self-regulating losses, but prompts.text_weight, "
                      "image_weight and kl_weight are all 0; set them (PromptSRC: 25, 10, 1) or use kind ivlp")
