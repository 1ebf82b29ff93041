"""Stage ``features``: cache the teacher's class vectors, image features, logits and a faiss index.

Phase 1, one item per (dataset, domain) a task touches: teacher image features of every image plus a faiss
index over them (the CoOp teacher has no visual prompt, so its image features do not depend on the task).
Phase 2, one item per task: zero-shot and learned-prompt class vectors (one set per prompt epoch), the
target logits the student distils from, and the teacher's per-epoch predictions for the evaluate stage.
No labels are read here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import task_domains
from pipeline.data.classlists import prompt_name
from pipeline.features.cache import (build_index, domain_dir, encode_images, logits, prompted_vectors,
                                     save_index, task_dir, zero_shot_vectors)
from pipeline.io import atomic_dir, atomic_save_npy, atomic_write_json
from pipeline.models.factory import assert_same_identity, load_model
from pipeline.orchestration.stage import (checked_model_spec, record_run, run_stage_items, shard_dir,
                                          start, task_label)

STAGE = "features"


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    ft, rt = params["features"], params["runtime"]
    spec = checked_model_spec(params, "teacher")  # before any work
    prompts_dir = Path(params["paths"]["prompts"])
    with atomic_dir(params["paths"]["features"]) as tmp:
        def domain_work(name, pair, device):
            teacher = load_model(spec, device=device)
            keys, feats = encode_images(teacher, shard_dir(params, *pair), batch_size=ft["batch_size"],
                                        device=device, num_workers=rt["num_workers"], desc=f"features {name}")
            out = domain_dir(tmp, *pair)
            atomic_save_npy(out / "features.npy", feats)
            atomic_write_json(out / "keys.json", keys)
            index, meta = build_index(feats, index_type=ft["faiss_index"], device=device)
            save_index(index, out / "index.faiss")
            atomic_write_json(out / "index.json", {**meta, "model": teacher.identity})
            return {"n": len(keys)}

        def task_work(name, task, device):
            teacher = load_model(spec, device=device)
            prompt = torch.load(prompts_dir / name / "prompt.pt", map_location="cpu", weights_only=True)
            assert_same_identity(teacher.identity, prompt["identity"], what=f"prompts/{name}/prompt.pt")
            classnames = [prompt_name(c) for c in prompt["classes"]]
            zero_shot = zero_shot_vectors(teacher, classnames, ft["templates"], device=device)
            per_epoch = prompted_vectors(teacher, classnames, template=prompt["template"],
                                         contexts=prompt["contexts"], device=device)
            out, scale = task_dir(tmp, name), teacher.logit_scale
            for side in ("source", "target"):
                feats = np.load(domain_dir(tmp, task["dataset"], task[side]) / "features.npy")
                atomic_save_npy(out / f"zeroshot_preds_{side}.npy", logits(feats, zero_shot, scale).argmax(1))
                atomic_save_npy(out / f"teacher_preds_{side}.npy",
                                np.stack([logits(feats, w, scale).argmax(1) for w in per_epoch]))
                if side == "target":
                    atomic_save_npy(out / "target_logits.npy", logits(feats, per_epoch[-1], scale))
            atomic_save_npy(out / "class_vectors.npy", per_epoch[-1])  # shared with the student
            atomic_save_npy(out / "zeroshot_vectors.npy", zero_shot)
            atomic_write_json(out / "meta.json", {"task": task, "classes": prompt["classes"], "logit_scale": scale,
                                                  "templates": ft["templates"], "model": teacher.identity,
                                                  "prompt_epochs": int(len(per_epoch))})
            return {"classes": len(classnames)}

        label = task_label(params)
        run_stage_items(STAGE, params, task_domains(params), domain_work, label=f"domains-{label}")
        run_stage_items(STAGE, params, params["tasks"], task_work, label=f"tasks-{label}")
    record_run(params, STAGE)


if __name__ == "__main__":
    main()
