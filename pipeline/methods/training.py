"""The training shell every method shares, and its pieces: seeding, optimiser steps, schedules, guards.

A method supplies its batches, its loss step(s) and its predict; :func:`fit` runs the epochs: per
iteration each :class:`Step` computes its loss, which is checked for NaN/inf, back-propagated and applied
(then the step's ``after`` hook, e.g. CMKD's RST projection, and a per-iteration scheduler); per epoch the
per-epoch schedulers step, the method predicts every target image and :class:`EpochRecorder` keeps the
predictions and the log, guards against collapse and writes the last good checkpoint, which is also the
snapshot an interrupted run resumes from (everything needed to finish it exactly as if never stopped).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from pipeline.io import CheckpointError, atomic_torch_save, load_checkpoint
from pipeline.progress import progress

_GLOBAL_RNG = threading.Lock()
# Resume decisions (continue, ignore a snapshot, reuse, start fresh) always get a line in the stage log: a
# stage process leaves the root logger at Prefect's level (WARNING), which would drop INFO records.
resume_log = logging.getLogger("pipeline.resume")
log = logging.getLogger(__name__)


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
    """Per-epoch log and target predictions of a training run, its collapse guard and its snapshot.

    After each epoch :func:`fit` hands over the log entry, the target predictions (shard order; None for a
    run with no target to predict), other rules' predictions, the trainable state and what it needs to
    resume. With a ``reference`` (the teacher's predictions of the same images) the entry gets
    ``agreement_with_teacher``. If one class takes more than ``collapse_fraction`` of the predictions the run
    stops with :class:`TrainingCollapsed`, leaving the snapshot of the previous (good) epoch in place; otherwise the
    epoch is kept and, with a ``checkpoint_path``, written there atomically: ``epoch``, ``state`` (the last
    good trainable state), ``log``, ``keys``, ``predictions``, ``extra`` and ``resume``.
    """

    def __init__(self, *, n_classes: int, collapse_fraction: float, checkpoint_path=None, where: str = "training"):
        self.n_classes, self.collapse_fraction = n_classes, collapse_fraction
        self.checkpoint_path, self.where = checkpoint_path, where
        self.keys: list[str] | None = None
        self.predictions: list[np.ndarray] = []
        self.extra: dict[str, list[np.ndarray]] = {}
        self.log: list[dict] = []

    def add(self, epoch: int, keys: list[str] | None, predictions: np.ndarray | None, log_entry: dict, state: dict,
            *, extra: dict[str, np.ndarray] | None = None, resume: dict | None = None,
            reference: np.ndarray | None = None) -> None:
        if predictions is not None:
            log_entry = self._guard(epoch, keys, np.asarray(predictions), log_entry)
            if reference is not None:
                log_entry["agreement_with_teacher"] = agreement(predictions, reference, where=self.where)
            self.keys = keys
            self.predictions.append(np.asarray(predictions))
        for name, preds in (extra or {}).items():
            self.extra.setdefault(name, []).append(np.asarray(preds))
        self.log.append(log_entry)
        if self.checkpoint_path is not None:
            atomic_torch_save(self.checkpoint_path, {
                "epoch": epoch, "state": state, "log": self.log, "keys": self.keys,
                "predictions": [torch.from_numpy(p) for p in self.predictions],  # weights-only files hold tensors
                "extra": {k: [torch.from_numpy(p) for p in v] for k, v in self.extra.items()}, "resume": resume})

    def _guard(self, epoch: int, keys: list[str], predictions: np.ndarray, log_entry: dict) -> dict:
        """The log entry with ``top_class_fraction``, after checking the order of rows and for collapse."""
        if self.keys is not None and keys != self.keys:  # rows of every epoch must mean the same images
            raise RuntimeError(f"{self.where}: target predictions of epoch {epoch} came in a different order")
        counts = np.bincount(predictions, minlength=self.n_classes)
        top = int(counts.argmax())
        fraction = float(counts[top]) / max(len(predictions), 1)
        if fraction > self.collapse_fraction:
            kept = (f"the last good checkpoint (epoch {epoch - 1}) is kept at {self.checkpoint_path}"
                    if self.checkpoint_path and epoch > 1 else "no earlier epoch to keep")
            raise TrainingCollapsed(
                f"{self.where}: epoch {epoch} predicts class {top} for {100 * fraction:.1f}% of the target images "
                f"(limit distill.collapse_fraction={self.collapse_fraction}); training collapsed, {kept}. Lower "
                f"the learning rate, shorten training or raise the pseudo-label threshold")
        return {**log_entry, "top_class_fraction": round(fraction, 4)}

    def restore(self, snapshot: dict) -> None:
        """Take back the epochs a snapshot written by :meth:`add` holds."""
        self.keys, self.log = snapshot["keys"], list(snapshot["log"])
        self.predictions = [p.numpy() for p in snapshot["predictions"]]
        self.extra = {k: [p.numpy() for p in v] for k, v in snapshot["extra"].items()}

    def result(self) -> dict:
        return {"keys": self.keys, "predictions": np.stack(self.predictions) if self.predictions else None,
                "extra": {k: np.stack(v) for k, v in self.extra.items()}, "log": self.log}


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
    """Target predictions of one epoch in ``keys`` order; ``extra`` holds other inference rules' predictions.

    ``reference``: what the method's teacher predicts for the same images (same order), computed without
    target labels; :func:`fit` logs the share the student agrees with as ``agreement_with_teacher``.
    """

    keys: list[str] | None
    predictions: np.ndarray | None
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    reference: np.ndarray | None = None


def agreement(predictions: np.ndarray, reference: np.ndarray, *, where: str = "training") -> float:
    """Percentage of ``predictions`` equal to ``reference`` (rounded to 0.01)."""
    predictions, reference = np.asarray(predictions), np.asarray(reference)
    if predictions.shape != reference.shape:
        raise ValueError(f"{where}: predictions of shape {predictions.shape} but a teacher reference of shape "
                         f"{reference.shape}")
    return round(100.0 * float(np.mean(predictions == reference)), 2) if len(predictions) else 0.0


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
        epoch_end: Callable[[int], None] | None = None, modules: dict[str, torch.nn.Module] | None = None,
        resumable: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train for ``epochs``; return ``{keys, predictions [E, N], extra {name: [E, N]}, log}``.

    ``batches(epoch)`` yields the epoch's batches; ``train_mode()`` (called before each epoch) puts the
    modules in training mode (frozen backbones stay in eval mode); ``epoch_end(epoch)`` runs after the
    epoch's schedulers stepped, before ``predict``. The log of an epoch holds the mean per iteration of every
    value the steps return, each step's learning rate (``lr`` for one step, else ``lr_<name>``), the
    iteration count and the seconds it took. Without ``predict`` (the source prompts, which have no target
    to predict) ``keys`` and ``predictions`` are None.

    Resuming: after every epoch :class:`EpochRecorder` writes a snapshot to ``checkpoint_path``. If that
    file exists when ``fit`` starts, training continues after the snapshot's epoch: ``state()``'s entries
    are loaded back into ``modules`` (same names), and the steps' optimisers and schedulers, ``resumable``
    (name -> torch generator, dict or list restored in place, or an object with ``state_dict`` /
    ``load_state_dict``: the method's generators, data-stream positions, counters), the iteration counter
    and the global random states (Python, numpy, torch, CUDA) get their saved states back, so the run ends
    exactly as an uninterrupted one. The caller keys the path by what produced the run
    (:mod:`pipeline.resume`); an unreadable snapshot is logged and ignored.
    """
    recorder = EpochRecorder(n_classes=n_classes, collapse_fraction=collapse_fraction,
                             checkpoint_path=checkpoint_path, where=where)
    carried = {**{f"optimizer.{s.name}": s.optimizer for s in steps},
               **{f"scheduler.{s.name}": s.scheduler for s in steps if s.scheduler is not None}, **(resumable or {})}
    first, t = 1, 0
    snapshot = _read_snapshot(checkpoint_path, where)
    if snapshot is not None:
        recorder.restore(snapshot)
        _load_modules(modules or {}, snapshot["state"], where=where)
        t = _restore(carried, snapshot["resume"])
        first = snapshot["epoch"] + 1
        resume_log.info("%s: resuming from %s after epoch %d of %d", where, checkpoint_path, first - 1, epochs)
    for epoch in progress(range(first, epochs + 1), desc=f"{where} epochs", unit="epoch", initial=first - 1,
                          total=epochs):
        start, sums, iterations = time.perf_counter(), {}, 0
        kept = str(checkpoint_path) if checkpoint_path and epoch > 1 else None
        lrs = {s.name: s.optimizer.param_groups[0]["lr"] for s in steps}  # the epoch's (first) learning rate
        if train_mode is not None:
            train_mode()
        for batch in progress(batches(epoch), desc=f"epoch {epoch}", unit="iter", leave=False):
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
        if epoch_end is not None:
            epoch_end(epoch)
        lr_log = {"lr": next(iter(lrs.values()))} if len(lrs) == 1 else {f"lr_{k}": v for k, v in lrs.items()}
        entry = {"epoch": epoch, **{k: v / max(iterations, 1) for k, v in sums.items()}, **lr_log,
                 "iterations": iterations, "seconds": time.perf_counter() - start}
        out = predict() if predict is not None else Prediction(None, None)
        # taken after predict: the next epoch starts from exactly these states
        resume = {"t": t, "carried": {k: _state_of(v) for k, v in carried.items()},
                  "rng": _global_rng_states()} if checkpoint_path is not None else None
        recorder.add(epoch, out.keys, out.predictions, entry, state=state() if state is not None else {},
                     extra=out.extra, resume=resume, reference=out.reference)
        log.info("%s", epoch_line(where, epochs, recorder.log[-1]))  # the kept entry: with the recorder's values
    return recorder.result()


def epoch_line(where: str, epochs: int, entry: dict) -> str:
    """The per-epoch log line: every logged value (loss, lr, agreement_with_teacher, top_class_fraction, ...)."""
    values = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k not in ("epoch", "seconds", "iterations"))
    return f"{where}: epoch {entry['epoch']}/{epochs} done in {entry['seconds']:.1f} s: {values}"


def _read_snapshot(path, where: str) -> dict | None:
    """The snapshot at ``path``, or None when there is none or it cannot be used (logged: a fresh start)."""
    if path is None or not Path(path).is_file():
        return None
    fresh = "it is ignored and training starts from epoch 1"
    try:
        snapshot = load_checkpoint(path, what="a training snapshot", fix=fresh)
    except CheckpointError as exc:
        resume_log.warning("%s: %s", where, exc)
        return None
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("resume"), dict):
        resume_log.warning("%s: %s holds no resume state (an older last-good checkpoint?); %s", where, path, fresh)
        return None
    return snapshot


def _load_modules(modules: dict[str, torch.nn.Module], state: dict, *, where: str) -> None:
    """Load ``state()``'s saved entries into ``modules``; entries left out of it (frozen backbones) stay."""
    if set(modules) != set(state):
        raise RuntimeError(f"{where}: the snapshot holds state of {sorted(state)} but the run restores "
                           f"{sorted(modules)}")
    for name, module in modules.items():
        unexpected = module.load_state_dict(state[name], strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"{where}: snapshot entries {unexpected[:5]} do not fit the model part {name!r}")


def _state_of(obj: Any) -> Any:
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, (dict, list)):
        return copy.copy(obj)
    return obj.state_dict()


def _load_into(obj: Any, saved: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(saved)
    elif isinstance(obj, dict):
        obj.clear()
        obj.update(saved)
    elif isinstance(obj, list):
        obj[:] = saved
    else:
        obj.load_state_dict(saved)


def _restore(carried: dict[str, Any], resume: dict) -> int:
    """Put the saved states back into ``carried`` and the global generators; return the iteration counter."""
    if set(carried) != set(resume["carried"]):
        raise RuntimeError(f"snapshot holds {sorted(resume['carried'])}, the run carries {sorted(carried)}")
    for name, obj in carried.items():
        _load_into(obj, resume["carried"][name])
    _set_global_rng_states(resume["rng"])
    return resume["t"]


def _global_rng_states() -> dict[str, Any]:
    """Python, numpy, torch CPU and (when in use) CUDA generator states, as weights-only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                        "has_gauss": has_gauss, "gauss": gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_global_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
