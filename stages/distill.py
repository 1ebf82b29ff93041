"""Stage ``distill``: train each task's student on its unlabelled target shards from cached teacher logits.

No target label is read: the student sees target images and the teacher's cached logits only. The student
saved per task is self-contained for inference (trainable state, the teacher's class vectors, logit scale
and both model identities).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.features.cache import domain_keys, task_dir
from pipeline.io import atomic_dir, atomic_save_npy, atomic_torch_save, atomic_write_json, read_json
from pipeline.methods.promptkd import TeacherLogits, distill_promptkd
from pipeline.models.factory import load_model
from pipeline.orchestration.stage import (checked_model_spec, record_run, run_stage_items, shard_dir,
                                          start, task_label)

STAGE = "distill"


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    d, rt = params["distill"], params["runtime"]
    spec = checked_model_spec(params, "student")  # before any work
    features = Path(params["paths"]["features"])
    with atomic_dir(params["paths"]["distill"]) as tmp:
        def work(name, task, device):
            student = load_model(spec, device=device)
            cached = task_dir(features, name)
            meta = read_json(cached / "meta.json")
            class_vectors = np.load(cached / "class_vectors.npy")
            teacher_logits = TeacherLogits(domain_keys(features, task["dataset"], task["target"]),
                                           np.load(cached / "target_logits.npy"))
            out = distill_promptkd(
                student_model=student, class_vectors=class_vectors, logit_scale=meta["logit_scale"],
                teacher_logits=teacher_logits, shard_dir=shard_dir(params, task["dataset"], task["target"]),
                epochs=d["epochs"], batch_size=d["batch_size"], lr=d["lr"], momentum=d["momentum"],
                weight_decay=d["weight_decay"], kd_weight=d["kd_weight"], kd_reduction=d["kd_reduction"],
                temperature=d["temperature"], n_tokens=d["n_tokens"], location=d["location"], depth=d["depth"],
                seed=params["seed"], device=device, num_workers=rt["num_workers"],
                deterministic=rt["deterministic"], eval_batch_size=params["evaluate"]["batch_size"])
            atomic_torch_save(tmp / name / "student.pt", {
                "state": out["state"], "class_vectors": torch.from_numpy(class_vectors), "classes": meta["classes"],
                "logit_scale": meta["logit_scale"], "student": student.identity, "teacher": meta["model"],
                "method": d["method"], "distill": d, "task": task})
            atomic_save_npy(tmp / name / "predictions.npy", out["predictions"])
            atomic_write_json(tmp / name / "keys.json", out["keys"])
            atomic_write_json(tmp / name / "train_log.json", {"trainable_params": out["trainable_params"],
                                                              "epochs": out["log"]})
            return out["log"][-1]

        run_stage_items(STAGE, params, params["tasks"], work, label=task_label(params))
    record_run(params, STAGE)


if __name__ == "__main__":
    main()
