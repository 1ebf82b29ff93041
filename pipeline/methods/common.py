"""Pieces every training loop shares: seeding, the Dassl-style optimiser/schedule, and a NaN guard."""
from __future__ import annotations

import random

import numpy as np
import torch


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept and the stage stops."""


def seed_everything(seed: int, *, deterministic: bool = True) -> torch.Generator:
    """Seed Python, numpy and torch; with ``deterministic`` ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def sgd_with_cosine(params, *, lr: float, momentum: float, weight_decay: float, epochs: int):
    """SGD (momentum, weight decay, no Nesterov) with cosine annealing stepped once per epoch (Dassl)."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return optimizer, scheduler


def check_finite(loss: torch.Tensor, *, where: str, checkpoint: str | None) -> None:
    """Stop with a clear message when the loss is NaN/inf (PDA#5-style divergence)."""
    if not torch.isfinite(loss):
        kept = f"; the last good checkpoint is kept at {checkpoint}" if checkpoint else ""
        raise TrainingDiverged(f"{where}: loss is {loss.item()} (diverged); lower the learning rate or use fp32"
                               f"{kept}")
