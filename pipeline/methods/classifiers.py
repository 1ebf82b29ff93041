"""The shipped inference models of the CLIP-style methods (``Method.classifier``; see :mod:`pipeline.student`).

Kept apart from :mod:`pipeline.methods.shared` so that the stages that only train prompts do not depend on
the distillation losses.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.losses import DistillLoss, build_distill_loss
from pipeline.methods.shared import make_student
from pipeline.models.factory import LoadedModel, autocast


class CosineClassifier(nn.Module):
    """Images -> logits of an image encoder against fixed class vectors: ``rule(s * norm(f) @ W^T, norm(f))``.

    What the CLIP-style methods predict with (their per-epoch predictions compute the same), as one module
    for shipping: ``rule`` is the distillation loss's prediction rule (``dual_head`` mixes in its own head),
    None for plain logits. Non-fp32 ``precision`` runs the encoder under autocast, as training did.
    """

    def __init__(self, encoder: nn.Module, class_vectors: torch.Tensor, logit_scale: float, *,
                 rule: DistillLoss | None = None, precision: str = "fp32"):
        super().__init__()
        self.encoder, self.rule, self.logit_scale, self.precision = encoder, rule, float(logit_scale), precision
        self.register_buffer("class_vectors", class_vectors.detach().float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cast = autocast(self.precision, images.device) if self.precision != "fp32" else contextlib.nullcontext()
        with cast:
            f = self.encoder(images)
        f = F.normalize(f.float(), dim=-1)
        z = self.logit_scale * f @ self.class_vectors.t()
        return z if self.rule is None else self.rule.inference_logits(z, f)


def prompted_student_classifier(state: dict[str, Any], config: dict[str, Any], base: LoadedModel
                                ) -> CosineClassifier:
    """The shipped student of promptkd and ekda (``Method.classifier``): prompted student image encoder and
    projector against the class vectors it trained with, through its loss's prediction rule."""
    block = config["params"]["distill"][config["method"]]
    W = state["class_vectors"]
    student = make_student(base.model.visual, teacher_dim=W.shape[1],
                           **{k: block[k] for k in ("n_tokens", "location", "depth")})
    student.load_trainable_state(state["student"])
    rule = build_distill_loss(block["loss"], n_classes=W.shape[0], feature_dim=W.shape[1])
    rule.load_state_dict(state.get("loss", {}))
    return CosineClassifier(student, W, config["logit_scale"], rule=rule,
                            precision=config["base"]["precision"]).eval()
