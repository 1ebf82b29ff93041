"""``binary_kl_norm``: w * DHKD's BinaryKL-Norm, the loss DHKD trains with, *instead of* the softmax KL.

Follows Yang et al., Dual-Head Knowledge Distillation (2024), ``penghui-yang/DHKD: distiller_zoo/BinaryKLNorm.py``,
the criterion its ``train_student.py --distill dhkd`` builds (``--BinaryKL_T``, default T = 2):
d = sigmoid((z_s - z_t)/T), L = (T^2/B) * sum_{i,k} [1/2 log(1/2 / d) + 1/2 log(1/2 / (1-d))], i.e. the Bernoulli
KL(Bernoulli(1/2) || Bernoulli(d)) per logit, B = the batch size. Each element equals log cosh((z_s - z_t)/(2T)) >= 0:
zero only when z_s = z_t element for element (unlike the softmax KL it is not blind to a per-row shift), about
|z_s - z_t|/(2T) - log 2 far from it.
Departures: log-sigmoid forms instead of the original's eps=1e-8 clamping of d (same value away from saturation,
finite everywhere, and the gradient does not vanish where the clamp would cut it); ``reduction="numel"`` divides by
B*C (Dassl convention) instead of B; the teacher is detached (DHKD runs it under no_grad). DHKD puts this loss on
an auxiliary head and predicts with the CE head; here it replaces the softmax KL on the student's only logits.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from pipeline.losses.distill_loss import DistillLoss
from pipeline.losses.kd import check_same_shape, reduce_kd


def binary_kl_norm(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                   reduction: str = "batchmean") -> torch.Tensor:
    """T^2 * sum of KL(Bernoulli(1/2) || Bernoulli(sigmoid((z_s - z_t)/T))) / B (or / (B*C)); teacher detached."""
    check_same_shape(student_logits, teacher_logits)
    x = (student_logits.float() - teacher_logits.detach().float()) / temperature
    # 1/2 [log(1/2) - log d] + 1/2 [log(1/2) - log(1 - d)] with log d = logsigmoid(x), log(1 - d) = logsigmoid(-x)
    per_element = -0.5 * (F.logsigmoid(x) + F.logsigmoid(-x)) - math.log(2.0)
    return reduce_kd(per_element.sum(), student_logits, reduction, "binary KL-norm") * temperature ** 2


class BinaryKLNorm(DistillLoss):
    name = "binary_kl_norm"

    def terms(self, z_s, z_t, *, f_s, f_t, class_centers) -> dict[str, torch.Tensor]:
        return {"binary_kl_norm": self.weight * binary_kl_norm(z_s, z_t, temperature=self.temperature,
                                                               reduction=self.reduction)}
