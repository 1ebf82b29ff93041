"""``nd``: KL + ``nd.weight`` * L_ND, which pulls the student feature's norm and direction to the teacher class centre.

Follows Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction" (ECCV 2024),
``WangYZ1608/Knowledge-Distillation-via-ND: CIFAR/utils.py`` (``DirectNormLoss``):
L_ND = (1/B) * sum_i [1 - <s_i, c_hat_{y_i}> / max(||s_i||, ||t_i||)].
UDA adaptation: y_i is the teacher's pseudo-label argmax z_t (no target labels) instead of the ground truth, and
c_hat are the teacher's unit-norm class text vectors instead of teacher class means over the training set.
As in the original, the gradient flows through s (also through ||s_i|| when it wins the max); t and c get none.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from pipeline.losses.distill_loss import DistillLoss
from pipeline.schema import number


def nd_loss(f_s: torch.Tensor, f_t: torch.Tensor, class_centers: torch.Tensor,
            labels: torch.Tensor) -> torch.Tensor:
    """L_ND for student features ``f_s`` [B,D] (un-normalised), teacher features ``f_t`` [B,D], centres [C,D]."""
    if f_s.dim() != 2 or f_s.shape != f_t.shape:
        raise ValueError(f"nd: student features {tuple(f_s.shape)} and teacher features {tuple(f_t.shape)} "
                         f"must both be [B, D]")
    if class_centers.dim() != 2 or class_centers.shape[1] != f_s.shape[1]:
        raise ValueError(f"nd: class_centers {tuple(class_centers.shape)} must be [C, {f_s.shape[1]}]")
    s = f_s.float()
    t = f_t.detach().float()
    centers = F.normalize(class_centers.detach().float(), dim=-1)   # defensive: they should be unit norm already
    c = centers[labels]                                             # [B, D]
    max_norm = torch.maximum(s.norm(dim=-1), t.norm(dim=-1))
    return (1.0 - (s * c).sum(-1) / max_norm).mean()


class ND(DistillLoss):
    name = "nd"
    params = {"weight": number(0.0, default=1.0)}   # lambda_ND, the ND paper's CIFAR value
    required_inputs = ("f_s", "f_t", "class_centers")

    def terms(self, z_s, z_t, *, f_s, f_t, class_centers) -> dict[str, torch.Tensor]:
        return {"kl": self.kl_term(z_s, z_t),
                "nd": float(self.cfg["nd"]["weight"]) * nd_loss(f_s, f_t, class_centers, z_t.argmax(dim=1))}
