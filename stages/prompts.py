"""Stage ``prompts``: learn each task's teacher prompts on its labelled source domain.

The prompt variant is ``prompts.kind`` (CoOp, CoCoOp, VPT, IVLP, MaPLe, PromptSRC:
:mod:`pipeline.methods.prompt_kinds`), with optional PromptSRC-style regularisation towards the zero-shot
teacher (its text vectors are the ``features.templates`` ensemble) and Gaussian prompt aggregation; see
:mod:`pipeline.methods.source_prompts`. An interrupted run continues from each
task's snapshot and reuses tasks that finished (:mod:`pipeline.resume`).
"""
from __future__ import annotations

import sys

import torch

from pipeline.artifacts import Artifacts
from pipeline.command import entry
from pipeline.data.classlists import prompt_name
from pipeline.data.shards import shard_classes
from pipeline.data.transforms import check_store_size
from pipeline.features.cache import zero_shot_vectors
from pipeline.io import atomic_dir, atomic_torch_save, atomic_write_json
from pipeline.methods.prompt_kinds import teacher_architecture, training_settings
from pipeline.methods.source_prompts import train_source_prompts
from pipeline.models.factory import load_model
from pipeline.orchestration.stage import (checked_model_spec, record_run, run_stage_items, shard_dir,
                                          start, task_label)
from pipeline.resume import clear_stage, item_resume, task_inputs

STAGE = "prompts"


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    pr, rt = params["prompts"], params["runtime"]
    architecture, training = teacher_architecture(pr), training_settings(pr)
    spec = checked_model_spec(params, "teacher")  # before any work
    with atomic_dir(params["paths"]["prompts"]) as tmp:
        def work(name, task, device):
            out_dir = Artifacts(params["paths"]).writing(STAGE, tmp).prompts(name)
            area = item_resume(params, STAGE, name, inputs=task_inputs(params, name, features=False),
                               label=f"task {name}")
            return area.run(out_dir.dir, lambda: train(name, task, device, out_dir, area.snapshot))

        def train(name, task, device, out_dir, snapshot):
            teacher = load_model(spec, device=device)
            check_store_size([shard_dir(params, task["dataset"], task["source"])], teacher.identity["preprocess"],
                             role="teacher", name=spec.name, kinds=(pr["augment"],))
            classes = shard_classes(*(shard_dir(params, task["dataset"], task[s]) for s in ("source", "target")))
            classnames = [prompt_name(c) for c in classes]
            zs_text = None
            if pr["text_weight"] or pr["kl_weight"]:
                templates = params["features"]["templates"]
                zs_text = torch.from_numpy(zero_shot_vectors(teacher, classnames, templates, device=device))
            out = train_source_prompts(
                teacher_model=teacher, classnames=classnames, architecture=architecture, config=pr, zs_text=zs_text,
                shard_dir=shard_dir(params, task["dataset"], task["source"]), **training,
                momentum=pr["momentum"], weight_decay=pr["weight_decay"],
                seed=params["seed"], device=device, num_workers=rt["num_workers"], deterministic=rt["deterministic"],
                checkpoint_path=snapshot)
            atomic_torch_save(out_dir.prompt, {
                "states": out["states"], "reported": out["reported"], "gpa": out["gpa"],
                "kind": pr["kind"], "config": architecture, "train_transform": pr["augment"], "classes": classes,
                "identity": teacher.identity, "logit_scale": out["logit_scale"], "task": task})
            atomic_write_json(out_dir.train_log, {"kind": pr["kind"], "trainable_params": out["trainable_params"],
                                                  "epochs": out["log"]})
            return out["log"][-1]

        run_stage_items(STAGE, params, params["tasks"], work, label=task_label(params))
    clear_stage(params, STAGE, params["tasks"])
    record_run(params, STAGE)


if __name__ == "__main__":
    sys.exit(entry(STAGE, main))
