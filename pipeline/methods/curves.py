"""A task's per-epoch training curves for ``dvc plots``, written with DVCLive from the recorded training log.

The distill stage writes them after training, from ``train_log.json``'s epochs: after a resume those hold
every epoch (the snapshot carries the log), so the curves are the same as for an uninterrupted run. One
DVCLive folder per task (:meth:`pipeline.artifacts.Artifacts.curves`) holds ``plots/metrics/<value>.tsv``
with columns ``step`` (the distillation epoch, from 1) and the value. dvc.yaml declares the plots by hand
(the folder of every task at once); DVCLive writes no dvc.yaml, no experiment, no report and no summary
``metrics.json`` (the last values are in train_log.json, and a JSON file in the plots folder would be read
as a plot). No target label is involved: target accuracy per epoch is the evaluate stage's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

# What a curve is drawn for: the method's losses (``total`` is CMKD's sum of terms), the learning rates
# (``lr_<step>`` for methods with several optimisers), the agreement of the student's target predictions
# with its teacher's (%, no labels) and the share of the most predicted class (the collapse guard's value).
FIXED = ("loss", "total", "lr", "agreement_with_teacher", "top_class_fraction")


def curve_values(entry: dict[str, Any]) -> dict[str, float]:
    """The values of one epoch's log entry that get a curve, in the entry's order."""
    return {k: float(v) for k, v in entry.items()
            if k in FIXED or k.endswith("_loss") or k.startswith("lr_")}


def write_curves(epochs: list[dict[str, Any]], out_dir: str | Path) -> list[str]:
    """Write one TSV per curve value of ``epochs`` (train_log.json's list) into ``out_dir``; return the names."""
    from dvclive import Live  # imported here: only the distill stage needs it

    class _FilesOnly(Live):
        # The log is replayed after training, so DVCLive is a file writer here. Its repository hooks would
        # run `dvc init` in a git repository without DVC, fail in one without commits and, at end() inside
        # `dvc exp run`, `git add` the stage's temporary folder; its Studio hooks would report a live run
        # that is already over. Neither adds anything to these files, so both are off (end() is not called).
        def _init_dvc(self) -> None:
            pass

        def _init_studio(self) -> None:
            self._studio_events_to_skip.update({"start", "data", "done"})

    live = _FilesOnly(str(out_dir), dvcyaml=False, save_dvc_exp=False, report=None)
    names: list[str] = []
    for entry in epochs:
        live.step = int(entry["epoch"])  # x is the distillation epoch, also for a log that starts later
        for name, value in curve_values(entry).items():
            live.log_metric(name, value)  # appends a row to plots/metrics/<name>.tsv at once
            if name not in names:
                names.append(name)
    return names
