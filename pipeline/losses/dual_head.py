"""``dual_head``: DHO's two heads, adapted to UDA; the only loss with parameters.

Follows Kang et al. 2025, Dual-Head Optimization for semi-supervised KD from VLMs (``erjui/DHO:
train_others.py``). The student's own logits z_s play DHO's KD head; this module owns DHO's CE head, a linear layer
on the L2-normalised student feature. Without target labels the CE head learns the teacher's pseudo-labels
argmax z_t (DHO: ground-truth labels of the labelled split). Loss = 1/2 CE(head) + 1/2 kl term on z_s; prediction
= log[(1-alpha) softmax(head) + alpha softmax(z_s/beta)].
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.losses.distill_loss import DistillLoss
from pipeline.schema import number


class DualHead(DistillLoss):
    """Has ``head``, a Linear(feature_dim, n_classes): optimise, move and save it with the student."""

    name = "dual_head"
    params = {   # the prediction rule; DHO grid-searches both on validation data
        "alpha": number(0.0, maximum=1.0, default=0.5),          # mix: 0 = CE head only, 1 = z_s only
        "beta": number(0.0, exclusive_min=True, default=1.0),    # temperature on z_s
    }
    required_inputs = ("f_s",)

    def __init__(self, cfg, *, n_classes: int, feature_dim: int):
        super().__init__(cfg, n_classes=n_classes, feature_dim=feature_dim)
        self.alpha = float(cfg["dual_head"]["alpha"])
        self.beta = float(cfg["dual_head"]["beta"])
        self.head = nn.Linear(feature_dim, n_classes)
        with torch.no_grad():                      # near-uniform start; prefer init_head(class_centers, scale)
            nn.init.normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)

    def init_head(self, class_centers: torch.Tensor, scale: float) -> None:
        """weight = scale * normalised class_centers [C,D], bias = 0 (zero-shot CLIP as a start)."""
        if tuple(class_centers.shape) != (self.n_classes, self.feature_dim):
            raise ValueError(f"init_head: class_centers {tuple(class_centers.shape)} must be "
                             f"[{self.n_classes}, {self.feature_dim}]")
        with torch.no_grad():
            self.head.weight.copy_(float(scale) * F.normalize(class_centers.detach().float(), dim=-1))
            self.head.bias.zero_()

    def head_logits(self, f_s: torch.Tensor) -> torch.Tensor:
        """The CE head's logits on the L2-normalised student features."""
        return self.head(F.normalize(f_s.float(), dim=-1))

    def terms(self, z_s, z_t, *, f_s, f_t, class_centers) -> dict[str, torch.Tensor]:
        return {"ce": 0.5 * F.cross_entropy(self.head_logits(f_s), z_t.argmax(dim=1)),
                "kl": 0.5 * self.kl_term(z_s, z_t)}

    def inference_logits(self, z_s: torch.Tensor, f_s: torch.Tensor | None = None) -> torch.Tensor:
        """log[(1-alpha) softmax(head(f_s)) + alpha softmax(z_s/beta)]."""
        self.need(f_s=f_s)
        self.check_features("f_s", f_s, z_s.shape[0])
        alpha, beta = self.alpha, self.beta
        with torch.autocast(device_type=z_s.device.type, enabled=False):
            log_head = F.log_softmax(self.head_logits(f_s), dim=-1)
            log_kd = F.log_softmax(z_s.float() / beta, dim=-1)
            if alpha == 0.0:
                return log_head
            if alpha == 1.0:
                return log_kd
            return torch.logaddexp(math.log(1.0 - alpha) + log_head, math.log(alpha) + log_kd)
