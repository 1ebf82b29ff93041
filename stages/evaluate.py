"""Stage ``evaluate``: score the zero-shot teacher, the source-prompted teacher and the student per task.

This is the only stage that reads target labels. Predictions made upstream are joined to the labels by
sample key. For models with epochs, the last epoch is the reported model; the best epoch is reported
separately and labelled as selected on target labels (oracle). The student is scored once per distill seed
(``models.student.seeds``); ``models.student.target`` is the first seed's run, the task's shipped student.
"""
from __future__ import annotations

import sys

import numpy as np

from pipeline.artifacts import SIDES, Artifacts, distill_seeds
from pipeline.command import entry
from pipeline.data.benchmarks import headline_metric
from pipeline.data.shards import read_labels, shard_keys
from pipeline.evaluation.metrics import classification_metrics, epoch_summary
from pipeline.io import atomic_dir, atomic_write_json, read_json
from pipeline.orchestration.stage import record_run, run_stage_items, shard_dir, start, task_label

STAGE = "evaluate"
PROTOCOL = "transductive UDA: the student trains on all (unlabelled) target images and is tested on them"


def labels_in_order(params: dict, dataset: str, domain: str, keys: list[str]) -> np.ndarray:
    """Target labels aligned with ``keys`` (the row order of upstream predictions)."""
    in_shards, labels = read_labels(shard_dir(params, dataset, domain))
    by_key = dict(zip(in_shards, labels.tolist()))
    predicted = set(keys)
    missing = [k for k in by_key if k not in predicted]
    if missing or len(predicted) != len(keys) or len(keys) != len(by_key):
        raise ValueError(f"predictions for {dataset}/{domain} do not match its shards ({len(keys)} predicted, "
                         f"{len(by_key)} in shards, e.g. missing {missing[:3]}); re-run the pipeline")
    return np.array([by_key[k] for k in keys])


def seed_row(summary: dict) -> dict:
    """What the report needs of one seed's run: last and best (oracle) accuracies and the per-epoch curve."""
    return {"acc": summary["last"]["acc"], "mean_class_acc": summary["last"]["mean_class_acc"],
            "best_acc": summary["best"]["acc"], "best_mean_class_acc": summary["best"]["mean_class_acc"],
            "per_epoch": summary["per_epoch"]}


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    artifacts, seeds = Artifacts(params["paths"]), distill_seeds(params)
    with atomic_dir(params["paths"]["evaluate"]) as tmp:
        def work(name, task, _device):
            cached, student = artifacts.features.task(name), artifacts.student(name)
            keys = {side: shard_keys(shard_dir(params, task["dataset"], task[side])) for side in SIDES}
            classes = cached.meta(keys)["classes"]  # checks that the cached predictions' rows are these keys
            models: dict = {"zeroshot_teacher": {}, "source_teacher": {}}
            for side in SIDES:
                y = labels_in_order(params, task["dataset"], task[side], keys[side])
                models["zeroshot_teacher"][side] = classification_metrics(
                    y, cached.load(cached.zeroshot_preds(side)), len(classes))
                models["source_teacher"][side] = epoch_summary(y, cached.load(cached.teacher_preds(side)), len(classes))
            student_keys = read_json(student.keys)
            y = labels_in_order(params, task["dataset"], task["target"], student_keys)
            runs = {}
            for seed, run in artifacts.student_runs(name, seeds).items():  # the first seed's is `student` itself
                if read_json(run.keys) != student_keys:
                    raise ValueError(f"{run.keys}: the run of seed {seed} predicted other target images than "
                                     f"{student.keys}; re-run the distill stage")
                runs[seed] = epoch_summary(y, run.read_predictions(), len(classes))
            models["student"] = {"target": runs[seeds[0]],
                                 "seeds": {str(seed): seed_row(summary) for seed, summary in runs.items()}}
            log = read_json(student.train_log)
            notes, method = log.get("extra_predictions", {}), log["method"]
            extras = {rule: {"target": epoch_summary(y, preds, len(classes)), "note": notes.get(rule, "")}
                      for rule, preds in student.read_extra_predictions().items()}
            result = {"task": name, **task, "classes": classes, "protocol": PROTOCOL, "method": method,
                      "models": models, "headline": headline_metric(params["data"]["datasets"][task["dataset"]])}
            if extras:
                result["extras"] = extras
            result["parameters"] = {"trainable": log["trainable_params"], **log.get("dsp", {})}
            atomic_write_json(artifacts.writing(STAGE, tmp).evaluation(name).metrics, result)
            return models["student"]["target"]["last"]["acc"]

        run_stage_items(STAGE, params, params["tasks"], work, label=task_label(params), on_gpu=False)
    record_run(params, STAGE)


if __name__ == "__main__":
    sys.exit(entry(STAGE, main))
