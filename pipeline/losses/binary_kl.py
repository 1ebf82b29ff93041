"""``binary_kl``: w * binary (per-class sigmoid) KL, DHKD's BinaryKL, *instead of* the softmax KL.

Follows Yang et al., Dual-Head Knowledge Distillation, ``penghui-yang/DHKD: distiller_zoo/BinaryKL.py``:
(T^2/B) * sum_{i,k} [s_t log(s_t/s_s) + (1-s_t) log((1-s_t)/(1-s_s))], s = sigmoid(z/T).
Departures: log-sigmoid forms instead of the original's eps=1e-8 clamping (same value away from saturation, finite
everywhere); ``reduction="numel"`` divides by B*C (Dassl convention) instead of B. DHKD puts this loss on an
auxiliary head; here it replaces the softmax KL on the student's only logits. DHKD's training script
(``train_student.py --distill dhkd``) uses the BinaryKLNorm variant instead: :mod:`pipeline.losses.binary_kl_norm`.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from pipeline.losses.distill_loss import DistillLoss
from pipeline.losses.kd import check_same_shape, reduce_kd


def binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
              reduction: str = "batchmean") -> torch.Tensor:
    """T^2 * sum of per-element Bernoulli KL(sigmoid(z_t/T) || sigmoid(z_s/T)) / B (or / (B*C)); teacher detached."""
    check_same_shape(student_logits, teacher_logits)
    a = teacher_logits.detach().float() / temperature
    b = student_logits.float() / temperature
    log_t, log_1mt = F.logsigmoid(a), F.logsigmoid(-a)    # log s_t, log (1 - s_t)
    log_s, log_1ms = F.logsigmoid(b), F.logsigmoid(-b)
    total = (log_t.exp() * (log_t - log_s) + log_1mt.exp() * (log_1mt - log_1ms)).sum()
    return reduce_kd(total, student_logits, reduction, "binary KL") * temperature ** 2


class BinaryKL(DistillLoss):
    name = "binary_kl"

    def terms(self, z_s, z_t, *, f_s, f_t, class_centers) -> dict[str, torch.Tensor]:
        return {"binary_kl": self.weight * binary_kl(z_s, z_t, temperature=self.temperature,
                                                     reduction=self.reduction)}
