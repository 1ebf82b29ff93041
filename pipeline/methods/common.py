"""Pieces every training loop shares: seeding, the Dassl-style optimiser/schedule, and a NaN guard."""
from __future__ import annotations

import contextlib
import random
import threading
from typing import Iterator

import numpy as np
import torch

from pipeline.io import atomic_torch_save

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


class TrainingCollapsed(RuntimeError):
    """Target predictions collapsed onto one class; the last good checkpoint is kept and the stage stops."""


class EpochRecorder:
    """Per-epoch target predictions, training log, collapse guard and last-good checkpoint of a training run.

    After each epoch a method hands over its target predictions (shard order), its log entry and its
    trainable state. If one class takes more than ``collapse_fraction`` of the predictions the run stops
    with :class:`TrainingCollapsed`, leaving the checkpoint of the previous (good) epoch in place; otherwise
    the state is written to ``checkpoint_path`` (atomically) and the epoch is kept.
    """

    def __init__(self, *, n_classes: int, collapse_fraction: float, checkpoint_path=None, where: str = "training"):
        self.n_classes, self.collapse_fraction = n_classes, collapse_fraction
        self.checkpoint_path, self.where = checkpoint_path, where
        self.keys: list[str] | None = None
        self.predictions: list[np.ndarray] = []
        self.log: list[dict] = []

    def add(self, epoch: int, keys: list[str], predictions: np.ndarray, log_entry: dict, state: dict) -> None:
        if self.keys is not None and keys != self.keys:  # rows of every epoch must mean the same images
            raise RuntimeError(f"{self.where}: target predictions of epoch {epoch} came in a different order")
        counts = np.bincount(predictions, minlength=self.n_classes)
        top = int(counts.argmax())
        fraction = float(counts[top]) / max(len(predictions), 1)
        log_entry = {**log_entry, "top_class_fraction": round(fraction, 4)}
        if fraction > self.collapse_fraction:
            kept = (f"the last good checkpoint (epoch {epoch - 1}) is kept at {self.checkpoint_path}"
                    if self.checkpoint_path and epoch > 1 else "no earlier epoch to keep")
            raise TrainingCollapsed(
                f"{self.where}: epoch {epoch} predicts class {top} for {100 * fraction:.1f}% of the target images "
                f"(limit distill.collapse_fraction={self.collapse_fraction}); training collapsed, {kept}. Lower "
                f"the learning rate, shorten training or raise the pseudo-label threshold")
        self.keys = keys
        self.predictions.append(np.asarray(predictions))
        self.log.append(log_entry)
        if self.checkpoint_path is not None:
            atomic_torch_save(self.checkpoint_path, {"epoch": epoch, "state": state, "log": self.log})

    def result(self) -> dict:
        return {"keys": self.keys, "predictions": np.stack(self.predictions), "log": self.log}
