"""``kl``: w * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), the PromptKD/EKDA logit loss.

Follows PromptKD (Li et al., CVPR 2024, ``zhengli97/PromptKD: trainers/promptkd.py``) and EKDA; the arithmetic
and the explicit normalisation (``reduction``) are in :mod:`pipeline.losses.kd`.
"""
from __future__ import annotations

import torch

from pipeline.losses.distill_loss import DistillLoss


class KL(DistillLoss):
    name = "kl"

    def terms(self, z_s, z_t, *, f_s, f_t, class_centers) -> dict[str, torch.Tensor]:
        return {"kl": self.kl_term(z_s, z_t)}
