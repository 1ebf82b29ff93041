"""Stage ``prompts``: learn each task's teacher text context on its labelled source domain (CoOp)."""
from __future__ import annotations

from pipeline.data.classlists import prompt_name
from pipeline.data.shards import shard_classes
from pipeline.io import atomic_dir, atomic_torch_save, atomic_write_json
from pipeline.methods.source_prompts import train_source_prompts
from pipeline.models.factory import load_model
from pipeline.orchestration.stage import (checked_model_spec, record_run, run_stage_items, shard_dir,
                                          start, task_label)

STAGE = "prompts"


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    pr, rt = params["prompts"], params["runtime"]
    spec = checked_model_spec(params, "teacher")  # before any work
    with atomic_dir(params["paths"]["prompts"]) as tmp:
        def work(name, task, device):
            teacher = load_model(spec, device=device)
            classes = shard_classes(*(shard_dir(params, task["dataset"], task[s]) for s in ("source", "target")))
            out = train_source_prompts(
                teacher=teacher, classnames=[prompt_name(c) for c in classes],
                shard_dir=shard_dir(params, task["dataset"], task["source"]), template=pr["template"],
                n_ctx=pr["n_ctx"], init=pr["init"], class_specific=pr["class_specific"], epochs=pr["epochs"],
                batch_size=pr["batch_size"], lr=pr["lr"], momentum=pr["momentum"], weight_decay=pr["weight_decay"],
                seed=params["seed"], device=device, num_workers=rt["num_workers"], deterministic=rt["deterministic"])
            atomic_torch_save(tmp / name / "prompt.pt", {
                "contexts": out["contexts"], "template": pr["template"], "classes": classes,
                "identity": teacher.identity, "logit_scale": out["logit_scale"], "task": task})
            atomic_write_json(tmp / name / "train_log.json", out["log"])
            return out["log"][-1]

        run_stage_items(STAGE, params, params["tasks"], work, label=task_label(params))
    record_run(params, STAGE)


if __name__ == "__main__":
    main()
