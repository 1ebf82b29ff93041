"""The training shell every method shares, and its pieces: seeding, optimiser steps, schedules, guards.

A method supplies its batches, its loss step(s) and its predict; :func:`fit` runs the epochs: per
iteration each :class:`Step` computes its loss, which is checked for NaN/inf, back-propagated and applied
(then the step's ``after`` hook, e.g. CMKD's RST projection, and a per-iteration scheduler); per epoch the
per-epoch schedulers step, the method predicts every target image and :class:`EpochRecorder` keeps the
predictions and the log, guards against collapse and writes the last good checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

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


@dataclasses.dataclass(frozen=True)
class Iteration:
    """Where training is: ``epoch`` counts from 1, ``t`` is the global iteration counter from 0."""

    epoch: int
    t: int


@dataclasses.dataclass
class Step:
    """One optimiser update per iteration: ``loss(batch, it)`` returns the loss and values to log.

    ``scheduler`` steps once per epoch (``per="epoch"``, the Dassl cosine) or after every update
    (``per="iteration"``, CMKD's inverse decay); ``after`` runs after every update (CMKD's RST projection).
    """

    name: str
    loss: Callable[[Any, Iteration], tuple[torch.Tensor, dict[str, float]]]
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    per: str = "epoch"
    after: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if self.per not in ("epoch", "iteration"):
            raise ValueError(f"Step {self.name!r}: per={self.per!r}, expected 'epoch' or 'iteration'")


@dataclasses.dataclass
class Prediction:
    """Target predictions of one epoch in ``keys`` order; ``extra`` holds other inference rules' predictions."""

    keys: list[str]
    predictions: np.ndarray
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def update(optimizer: torch.optim.Optimizer, value: torch.Tensor, *, where: str, checkpoint: str | None = None,
           after: Callable[[], None] | None = None) -> None:
    """One optimiser update from ``value``, after checking it is finite; then ``after()``."""
    check_finite(value, where=where, checkpoint=checkpoint)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    if after is not None:
        after()


def fit(*, where: str, epochs: int, batches: Callable[[int], Iterable], steps: list[Step],
        predict: Callable[[], Prediction] | None, state: Callable[[], dict] | None = None, n_classes: int = 0,
        collapse_fraction: float = 1.0, checkpoint_path=None, train_mode: Callable[[], None] | None = None,
        epoch_end: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train for ``epochs``; return ``{keys, predictions [E, N], extra {name: [E, N]}, log}``.

    ``batches(epoch)`` yields the epoch's batches; ``train_mode()`` (called before each epoch) puts the
    modules in training mode (frozen backbones stay in eval mode); ``epoch_end(epoch)`` runs after the
    epoch's schedulers stepped. The log of an epoch holds the mean per iteration of every value the steps
    return, each step's learning rate (``lr`` for one step, else ``lr_<name>``), the iteration count and the
    seconds it took. Without ``predict`` (the source prompts, which have no target to predict) nothing is
    recorded but the log.
    """
    recorder = EpochRecorder(n_classes=n_classes, collapse_fraction=collapse_fraction,
                             checkpoint_path=checkpoint_path, where=where) if predict is not None else None
    log: list[dict] = []
    extra: dict[str, list[np.ndarray]] = {}
    t = 0
    for epoch in tqdm(range(1, epochs + 1), desc=f"{where} epochs", unit="epoch"):
        start, sums, iterations = time.perf_counter(), {}, 0
        kept = str(checkpoint_path) if checkpoint_path and epoch > 1 else None
        lrs = {s.name: s.optimizer.param_groups[0]["lr"] for s in steps}  # the epoch's (first) learning rate
        if train_mode is not None:
            train_mode()
        for batch in tqdm(batches(epoch), desc=f"epoch {epoch}", unit="iter", leave=False):
            it = Iteration(epoch=epoch, t=t)
            for step in steps:
                value, logged = step.loss(batch, it)
                update(step.optimizer, value, where=f"{where} {step.name} step, epoch {epoch}", checkpoint=kept,
                       after=step.after)
                if step.scheduler is not None and step.per == "iteration":
                    step.scheduler.step()
                for key, v in logged.items():
                    sums[key] = sums.get(key, 0.0) + float(v)
            t += 1
            iterations += 1
        for step in steps:
            if step.scheduler is not None and step.per == "epoch":
                step.scheduler.step()
        lr_log = {"lr": next(iter(lrs.values()))} if len(lrs) == 1 else {f"lr_{k}": v for k, v in lrs.items()}
        entry = {"epoch": epoch, **{k: v / max(iterations, 1) for k, v in sums.items()}, **lr_log,
                 "iterations": iterations, "seconds": time.perf_counter() - start}
        if recorder is None:
            log.append(entry)
        else:
            out = predict()
            for name, preds in out.extra.items():
                extra.setdefault(name, []).append(np.asarray(preds))
            recorder.add(epoch, out.keys, out.predictions, entry, state=state())
        if epoch_end is not None:
            epoch_end(epoch)
    return {**(recorder.result() if recorder is not None else {"log": log}),
            "extra": {k: np.stack(v) for k, v in extra.items()}}
