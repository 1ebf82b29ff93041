"""Stage ``features``: cache the teacher's class vectors, image features, logits and a faiss index.

Phase 1, one item per (dataset, domain) a task touches: the plain (zero-shot) teacher image features of
every image plus a faiss index over them.
Phase 2, one item per task: zero-shot and learned-prompt class vectors (one set per prompt epoch, plus the
GPA aggregate when used), the target logits the student distils from, and the teacher's per-epoch
predictions for the evaluate stage. A teacher with visual prompts has task-specific image features: they
are re-encoded with the reported prompts (``target_features.npy``) and only that state is scored; so is a
CoCoOp teacher's, whose class vectors depend on the image (its logits take one text pass per image).
No labels are read here. File names and contents: :mod:`pipeline.artifacts`.
"""
from __future__ import annotations

import sys

import numpy as np

from pipeline.artifacts import SIDES, Artifacts, keys_digest
from pipeline.command import entry
from pipeline.config import task_domains
from pipeline.data.classlists import prompt_name
from pipeline.data.shards import shard_keys
from pipeline.data.transforms import check_store_size
from pipeline.features.cache import (build_index, conditional_logits, encode_images, encode_shards, logits,
                                     mean_conditioned_vectors, prompted_vectors, save_index, zero_shot_vectors)
from pipeline.io import atomic_dir, atomic_save_npy, atomic_write_json, load_checkpoint
from pipeline.methods.shared import build_teacher
from pipeline.models.factory import assert_same_identity, load_model
from pipeline.orchestration.stage import (checked_model_spec, record_run, run_stage_flow, run_stage_items,
                                          shard_dir, start, task_label)

STAGE = "features"


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    ft, rt = params["features"], params["runtime"]
    spec = checked_model_spec(params, "teacher")  # before any work
    artifacts = Artifacts(params["paths"])
    with atomic_dir(params["paths"]["features"]) as tmp:
        cache = artifacts.writing(STAGE, tmp).features

        def domain_work(name, pair, device):
            teacher = load_model(spec, device=device)
            check_store_size([shard_dir(params, *pair)], teacher.identity["preprocess"], role="teacher",
                             name=spec.name)
            keys, feats = encode_images(teacher, shard_dir(params, *pair), batch_size=ft["batch_size"],
                                        device=device, num_workers=rt["num_workers"], desc=f"features {name}",
                                        decode=rt["decode"])
            out = cache.domain(*pair)
            atomic_save_npy(out.features_path, feats)
            atomic_write_json(out.keys_path, keys)
            index, meta = build_index(feats, index_type=ft["faiss_index"], device=device)
            save_index(index, out.index_path)
            atomic_write_json(out.index_meta_path, {**meta, "model": teacher.identity})
            return {"n": len(keys)}

        def task_work(name, task, device):
            model = load_model(spec, device=device)
            prompt_path = artifacts.prompts(name).prompt
            prompt = load_checkpoint(prompt_path, what="the prompts stage's prompt.pt (weights only)",
                                     fix="re-create it with `dvc repro prompts`")
            assert_same_identity(model.identity, prompt["identity"], what=str(prompt_path))
            classnames = [prompt_name(c) for c in prompt["classes"]]
            zero_shot = zero_shot_vectors(model, classnames, ft["templates"], device=device)
            teacher = build_teacher(model, classnames, prompt["config"]).to(device).eval()
            # rows of the teacher's per-epoch predictions; the last row is the reported teacher
            rows = prompt["states"] + ([prompt["reported"]] if prompt["gpa"] else [])
            if teacher.prompted_vision or teacher.conditional:  # per-image work: the reported state only
                rows = [prompt["reported"]]
            precision = model.spec.precision
            per_epoch = None if teacher.conditional else prompted_vectors(teacher, rows, precision=precision,
                                                                          device=device)
            teacher.load_trainable_state(prompt["reported"])
            out, scale = cache.task(name), model.logit_scale
            keys = {side: shard_keys(shard_dir(params, task["dataset"], task[side])) for side in SIDES}
            for side in SIDES:
                plain = cache.domain(task["dataset"], task[side]).features(keys[side])
                feats = plain
                if teacher.prompted_vision:
                    _, encoded, _ = encode_shards(teacher.image_features, shard_dir(params, task["dataset"], task[side]),
                                                  transform=model.preprocess, batch_size=ft["batch_size"],
                                                  device=device, precision=precision,
                                                  num_workers=rt["num_workers"], desc=f"prompted features {side}",
                                                  decode=rt["decode"], preprocess=model.identity["preprocess"])
                    feats = encoded.numpy().astype(np.float32)
                    if side == "target":
                        atomic_save_npy(out.target_features, feats)
                if teacher.conditional:
                    z = [conditional_logits(teacher, feats, scale, precision=precision, device=device,
                                            batch_size=ft["batch_size"])]
                else:
                    z = [logits(feats, w, scale) for w in per_epoch]
                atomic_save_npy(out.zeroshot_preds(side), logits(plain, zero_shot, scale).argmax(1))
                atomic_save_npy(out.teacher_preds(side), np.stack([row.argmax(1) for row in z]))
                if side == "target":
                    atomic_save_npy(out.target_logits, z[-1])
                    vectors = (per_epoch[-1] if per_epoch is not None
                               else mean_conditioned_vectors(teacher, feats, device=device))
            atomic_save_npy(out.class_vectors, vectors)  # shared with the student
            atomic_save_npy(out.zeroshot_vectors, zero_shot)
            atomic_write_json(out.meta_path, {
                "task": task, "classes": prompt["classes"], "logit_scale": scale, "templates": ft["templates"],
                "model": model.identity, "prompt_kind": prompt["kind"], "prompt_epochs": len(prompt["states"]),
                "gpa": prompt["gpa"], "prompt_train_transform": prompt["train_transform"],
                "teacher_rows": len(rows), "visual_prompts": teacher.prompted_vision,
                "keys": {side: keys_digest(k) for side, k in keys.items()}})
            return {"classes": len(classnames)}

        label = task_label(params)

        def both_phases():  # one flow for the stage; the task items need every domain item done
            run_stage_items(STAGE, params, task_domains(params), domain_work, label=label)
            run_stage_items(STAGE, params, params["tasks"], task_work, label=label)

        run_stage_flow(STAGE, params, both_phases, label=label)
    record_run(params, STAGE)


if __name__ == "__main__":
    sys.exit(entry(STAGE, main))
