"""Temperature-scaled KL distillation with an explicit normalisation.

``reduction="batchmean"`` divides the summed KL by the batch size B; ``"numel"`` divides by B*C, the
Dassl-lineage convention of PromptKD/CDU/EKDA. A KD weight w under ``numel`` equals w/C under ``batchmean``,
so a weight copied from a paper is only meaningful together with its normalisation.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

REDUCTIONS = ("batchmean", "numel")  # sum / B, or sum / (B*C) (Dassl lineage)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                  reduction: str = "batchmean") -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), reduced per ``reduction``; the teacher gets no gradient."""
    check_same_shape(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    total = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return reduce_kd(total, student_logits, reduction, "KL") * temperature ** 2


def check_same_shape(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")


def reduce_kd(total: torch.Tensor, logits: torch.Tensor, reduction: str, what: str) -> torch.Tensor:
    """A summed KD term divided by B (``batchmean``) or B*C (``numel``)."""
    if reduction == "batchmean":
        return total / logits.shape[0]
    if reduction == "numel":
        return total / logits.numel()
    raise ValueError(f"{what} reduction {reduction!r} is not one of ['batchmean', 'numel']")
