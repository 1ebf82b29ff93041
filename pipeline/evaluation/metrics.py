"""Classification metrics over integer class indices.

Accuracies are percentages (floats in [0, 100]) and are not rounded here; the report rounds them.
"""
from __future__ import annotations

from typing import Any

import numpy as np

SELECTION_NOTE = "best epoch is selected on target labels (oracle); last is the reported model"


def _class_indices(values: Any, name: str, num_classes: int) -> np.ndarray:
    """Return ``values`` as a 1-D int64 array, checking every entry is a class index in [0, num_classes)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        # Accept integral floats (e.g. indices reloaded from JSON as floats) but never truncate 1.5 to 1.
        if arr.dtype.kind != "f":
            raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
        not_int = ~(np.isfinite(arr) & (arr == np.round(arr)))
        if not_int.any():
            raise ValueError(f"{name} holds {arr[np.argmax(not_int)].item()!r}, not an integer class index")
    arr = arr.astype(np.int64)
    out_of_range = (arr < 0) | (arr >= num_classes)
    if out_of_range.any():
        bad = int(arr[np.argmax(out_of_range)])
        raise ValueError(f"{name} holds {bad}, outside [0, {num_classes}) for num_classes={num_classes}")
    return arr


def classification_metrics(labels: Any, preds: Any, num_classes: int) -> dict[str, Any]:
    """Accuracy, mean-class accuracy, per-class accuracy and the confusion matrix of ``preds`` vs ``labels``.

    ``per_class[c]`` is ``None`` for a class with no sample, and such classes are left out of
    ``mean_class_acc`` (averaging a 0 for them would punish the model for the data set's make-up).
    ``confusion[true][pred]`` holds counts.
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    labels = _class_indices(labels, "labels", num_classes)
    preds = _class_indices(preds, "preds", num_classes)
    if labels.shape != preds.shape:
        raise ValueError(f"labels and preds differ in length: {labels.size} vs {preds.size}")
    if labels.size == 0:
        raise ValueError("labels and preds are empty; accuracy is undefined")

    confusion = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)
    support = confusion.sum(axis=1)
    correct = np.diag(confusion)
    per_class = [100.0 * int(c) / int(s) if s else None for c, s in zip(correct, support)]
    present = [a for a in per_class if a is not None]
    return {
        "acc": 100.0 * int(correct.sum()) / int(labels.size),
        "mean_class_acc": float(np.mean(present)),  # non-empty: n > 0 means some class has a sample
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "n": int(labels.size),
    }


def epoch_summary(labels: Any, preds_per_epoch: Any, num_classes: int) -> dict[str, Any]:
    """Metrics of every epoch's predictions (``preds_per_epoch`` has shape [epochs, samples]).

    ``last`` is the model we report; ``best`` (highest accuracy, earliest epoch on ties) is chosen by looking
    at the target labels, so it is an oracle upper bound and is labelled as such.
    """
    preds_per_epoch = np.asarray(preds_per_epoch)
    if preds_per_epoch.ndim != 2 or preds_per_epoch.shape[0] == 0:
        raise ValueError(f"preds_per_epoch must have shape [epochs >= 1, samples], got {preds_per_epoch.shape}")
    per_epoch = [classification_metrics(labels, p, num_classes) for p in preds_per_epoch]
    accs = [m["acc"] for m in per_epoch]
    # Every epoch has the same n, so equal correct counts give bit-identical accs and ties compare exactly;
    # max() keeps the first maximum, i.e. the earliest epoch.
    best = max(range(len(accs)), key=accs.__getitem__)
    return {
        "per_epoch": accs,
        "per_epoch_mean_class": [m["mean_class_acc"] for m in per_epoch],
        "last": per_epoch[-1],
        "best": per_epoch[best],
        "best_epoch": best + 1,
        "selection": SELECTION_NOTE,
    }
