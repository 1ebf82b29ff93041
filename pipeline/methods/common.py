"""Pieces every training loop shares: seeding, the Dassl-style optimiser/schedule, and a NaN guard."""
from __future__ import annotations

import contextlib
import random
import threading
from typing import Iterator

import numpy as np
import torch

_GLOBAL_RNG = threading.Lock()


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept and the stage stops."""


@contextlib.contextmanager
def seeded(seed: int, *, deterministic: bool = True) -> Iterator[torch.Generator]:
    """Seed Python, numpy and torch for the code in the block, which should build models and parameters.

    Work items of a stage run in threads (one per GPU) and parameter initialisers draw from torch's global
    generator, so the block holds a lock: every item gets the same initial weights whatever runs beside it.
    Training loops then draw only from the yielded generator. ``deterministic`` asks torch for
    deterministic kernels.
    """
    with _GLOBAL_RNG:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        yield torch.Generator().manual_seed(seed)


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
