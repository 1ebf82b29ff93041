"""Stage ``distill``: adapt each task to its unlabelled target with the method named in ``distill.method``.

The methods are the registry :data:`pipeline.methods.METHODS`; each method's module says what it trains.
No target label is read. Each task trains once per seed of ``seeds`` (default: ``[seed]``): the first seed's
run is the task's student, the others are ``<task>.seed<s>`` (:func:`pipeline.artifacts.run_name`). Each run's
output is self-contained for inference (trainable state, class vectors, logit scale, model identities with
precision and preprocessing), plus per-epoch target predictions for the evaluate
stage. A running task's snapshot (its last good state) and a finished task's outputs are kept under
``paths.checkpoints`` (not a DVC output) until the stage completes, so a collapse or divergence leaves the
snapshot in place and a re-run continues where an interrupted one stopped (:mod:`pipeline.resume`).
Each task's training curves (loss, learning rate, agreement with the teacher, top-class fraction per epoch)
go to ``paths.curves`` for ``dvc plots`` (:mod:`pipeline.methods.curves`).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from pipeline.artifacts import Artifacts, distill_seeds, run_name
from pipeline.command import entry
from pipeline.data.transforms import check_store_size
from pipeline.io import atomic_dir, atomic_torch_save, atomic_write_json, read_json
from pipeline.methods import METHODS
from pipeline.methods.base import TaskJob
from pipeline.methods.curves import write_curves
from pipeline.models.factory import load_model
from pipeline.orchestration.stage import checked_model_spec, record_run, run_stage_items, start, task_label
from pipeline.resume import clear_stage, item_resume, task_inputs

STAGE = "distill"


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    d = params["distill"]
    method = METHODS[d["method"]]
    specs = {role: checked_model_spec(params, role) for role in method.roles}  # before any work
    artifacts = Artifacts(params["paths"])
    seeds = distill_seeds(params)
    # One work item per (task, seed) run; a run sees the params of its own seed only, so adding a seed
    # neither changes nor restarts the runs already there.
    runs = {run_name(name, seed, seeds): (name, task, {**params, "seed": seed, "seeds": [seed]})
            for name, task in params["tasks"].items() for seed in seeds}
    with atomic_dir(params["paths"]["distill"]) as tmp:
        def work(run, item, device):
            name, task, run_params = item
            out = artifacts.writing(STAGE, tmp).student(run)
            area = item_resume(run_params, STAGE, run, task=name, inputs=task_inputs(params, name, features=True),
                               label=f"task {name}" if run == name else f"task {name}, seed {run_params['seed']}")
            return area.run(out.dir, lambda: train(name, task, run_params, device, out, area.snapshot))

        def train(name, task, run_params, device, out, snapshot):
            models = {role: load_model(spec, device=device) for role, spec in specs.items()}
            # Any model may read the task's shards, through its eval transform or the method's train view.
            shards = [artifacts.shards(task["dataset"], task[side]) for side in ("source", "target")]
            kinds = (d[method.name].get("augment", "none"),)
            for role, model in models.items():
                check_store_size(shards, model.identity["preprocess"], role=role, name=specs[role].name, kinds=kinds)
            job = TaskJob(name=name, task=task, params=run_params, models=models, device=device, artifacts=artifacts,
                          checkpoint_path=snapshot, output=out)
            result = method.run(job)
            vectors = result.class_vectors
            atomic_torch_save(out.checkpoint, {
                "method": method.name, "state": result.state, "classes": job.classes, "logit_scale": job.logit_scale,
                "class_vectors": None if vectors is None else torch.from_numpy(np.asarray(vectors)),
                "models": {role: m.identity for role, m in models.items()}, "cached_teacher": job.meta["model"],
                "distill": d, "task": task, "seed": job.seed, **result.checkpoint})
            out.write_predictions(result.keys, result.predictions, result.extra_predictions)
            atomic_write_json(out.train_log, {
                "method": method.name, "seed": job.seed, "refine_knn": d["refine_knn"],
                "trainable_params": result.trainable_params, **result.log_extra,
                "extra_predictions": result.extra_notes, "epochs": result.log})
            return result.log[-1]

        run_stage_items(STAGE, params, runs, work, label=task_label(params))
        # From each finished run's log (restored with it after a resume), so the curves never miss an epoch.
        with atomic_dir(params["paths"]["curves"]) as curves:
            for run in runs:
                log = read_json(artifacts.writing(STAGE, tmp).student(run).train_log)
                write_curves(log["epochs"], artifacts.writing("curves", curves).curves(run))
    clear_stage(params, STAGE, runs)
    record_run(params, STAGE)


if __name__ == "__main__":
    sys.exit(entry(STAGE, main))
