"""``soft_ce``: w * the soft-target cross-entropy of SinKD, *instead of* the softmax KL.

Follows Cui et al., Sinkhorn Distance Minimization for Knowledge Distillation (LREC-COLING 2024),
``2018cx/SinKD: loss.py`` (``DistillKL``, classification mode): L = -(1/B) sum_i sum_k p_t,ik log p_s,ik with
p = softmax(z/T). Unlike ``kl`` it has no T^2 factor and it includes the teacher's entropy H(p_t), so it is not zero
when the student equals the teacher (its gradient is the KL's divided by T^2). SinKD's ``glue_train.py`` trains
with alpha * this + (1 - alpha) * CE(labels) + beta * its Sinkhorn term (GLUE scripts: alpha 0.8-0.9, T 3-3.5);
``sinkhorn`` here pairs the Sinkhorn term with ``kl`` instead.
Departure: ``reduction="numel"`` divides by B*C (Dassl convention) instead of B; the teacher is detached.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from pipeline.losses.distill_loss import DistillLoss
from pipeline.losses.kd import check_same_shape, reduce_kd


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                       reduction: str = "batchmean") -> torch.Tensor:
    """-sum_{i,k} softmax(z_t/T) * log softmax(z_s/T) / B (or / (B*C)); no T^2; the teacher gets no gradient."""
    check_same_shape(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return reduce_kd(-(p_t * log_p_s).sum(), student_logits, reduction, "soft cross-entropy")


class SoftCE(DistillLoss):
    name = "soft_ce"

    def terms(self, z_s, z_t, *, f_s, f_t, class_centers) -> dict[str, torch.Tensor]:
        return {"soft_ce": self.weight * soft_cross_entropy(z_s, z_t, temperature=self.temperature,
                                                            reduction=self.reduction)}
