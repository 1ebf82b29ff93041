"""Temperature-scaled KL distillation with an explicit normalisation.

``reduction="batchmean"`` divides the summed KL by the batch size B; ``"numel"`` divides by B*C, the
Dassl-lineage convention of PromptKD/CDU/EKDA. A KD weight w under ``numel`` equals w/C under ``batchmean``,
so a weight copied from a paper is only meaningful together with its normalisation.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                  reduction: str = "batchmean") -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), reduced per ``reduction``; the teacher gets no gradient."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    total = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    if reduction == "batchmean":
        denom = student_logits.shape[0]
    elif reduction == "numel":
        denom = student_logits.numel()
    else:
        raise ValueError(f"KL reduction {reduction!r} is not one of ['batchmean', 'numel']")
    return total / denom * temperature ** 2
