"""Stage ``distill``: adapt each task to its unlabelled target with the method named in ``distill.method``.

* ``promptkd``: a student learns from the cached logits of the source-prompted teacher (two stages).
* ``ekda``: teacher prompts (source) and student (target) train together, alternating every iteration.
* ``dapl``: domain-specific text prompts on the frozen teacher CLIP, from cached image features.

No target label is read. Each task's output is self-contained for inference (trainable state, class
vectors, logit scale, model identities with precision and preprocessing), plus per-epoch target
predictions for the evaluate stage. The last good state of a running task is kept under
``paths.checkpoints`` (not a DVC output), so a collapse or divergence leaves it in place.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.classlists import prompt_name
from pipeline.data.shards import read_labels
from pipeline.features.cache import domain_dir, domain_keys, logits, task_dir, zero_shot_vectors
from pipeline.io import atomic_dir, atomic_save_npy, atomic_torch_save, atomic_write_json, read_json
from pipeline.losses import build_distill_loss
from pipeline.methods.dapl import naive_probabilities, train_dapl
from pipeline.methods.ekda import train_ekda
from pipeline.methods.promptkd import KeyedRows, distill_promptkd
from pipeline.methods.refine import KnnRefiner, softmax_np
from pipeline.models.factory import load_model
from pipeline.orchestration.stage import (checked_model_spec, record_run, run_stage_items, shard_dir,
                                          start, task_label)

STAGE = "distill"
ROLES = {"promptkd": ("student",), "ekda": ("teacher", "student"), "dapl": ("teacher",)}


def teacher_target_features(features: Path, name: str, task: dict) -> np.ndarray:
    """The teacher's target image features: re-encoded with its visual prompts when it has them."""
    prompted = task_dir(features, name) / "target_features.npy"
    return np.load(prompted if prompted.exists() else domain_dir(features, task["dataset"], task["target"]) /
                   "features.npy")


def source_labels(params: dict, task: dict, keys: list[str]) -> np.ndarray:
    shard_keys, labels = read_labels(shard_dir(params, task["dataset"], task["source"]))
    by_key = dict(zip(shard_keys, labels.tolist()))
    return np.array([by_key[k] for k in keys])


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    d, rt, method = params["distill"], params["runtime"], params["distill"]["method"]
    specs = {role: checked_model_spec(params, role) for role in ROLES[method]}  # before any work
    features = Path(params["paths"]["features"])
    with atomic_dir(params["paths"]["distill"]) as tmp:
        def work(name, task, device):
            models = {role: load_model(spec, device=device) for role, spec in specs.items()}
            cached = task_dir(features, name)
            meta = read_json(cached / "meta.json")
            classes, scale = meta["classes"], meta["logit_scale"]
            target_keys = domain_keys(features, task["dataset"], task["target"])
            target_feats = teacher_target_features(features, name, task)
            common = dict(epochs=d["epochs"], batch_size=d["batch_size"], lr=d["lr"], momentum=d["momentum"],
                          weight_decay=d["weight_decay"], seed=params["seed"], device=device,
                          collapse_fraction=d["collapse_fraction"], deterministic=rt["deterministic"],
                          checkpoint_path=Path(params["paths"]["checkpoints"]) / STAGE / name / "last_good.pt")
            student_args = {"num_workers": rt["num_workers"], "eval_batch_size": params["evaluate"]["batch_size"]}
            if method in ("promptkd", "ekda"):  # the student's visual prompts, from the method's own block
                student_args.update({k: d[method][k] for k in ("n_tokens", "location", "depth")})

            def refiner(probs: np.ndarray) -> KnnRefiner | None:
                return (KnnRefiner(target_keys, target_feats, probs, k=d["refine_knn"], device=device)
                        if d["refine_knn"] else None)

            if method == "promptkd":
                class_vectors = np.load(cached / "class_vectors.npy")
                z_t = np.load(cached / "target_logits.npy")
                knn = refiner(softmax_np(z_t))
                if knn is not None:  # refined distributions become the KD targets (log-probabilities as logits)
                    z_t = np.log(np.clip(knn.refine_all(), 1e-8, None))
                out = distill_promptkd(
                    student_model=models["student"], class_vectors=class_vectors, logit_scale=scale,
                    teacher_logits=KeyedRows(target_keys, z_t),
                    teacher_features=KeyedRows(target_keys, target_feats, "teacher features"),
                    loss=build_distill_loss(d["loss"], n_classes=len(classes), feature_dim=class_vectors.shape[1]),
                    shard_dir=shard_dir(params, task["dataset"], task["target"]), **common, **student_args)
            elif method == "ekda":
                zs_text = np.load(cached / "zeroshot_vectors.npy")
                source = task["dataset"], task["source"]
                source_plain = KeyedRows(domain_keys(features, *source),
                                         np.load(domain_dir(features, *source) / "features.npy"), "teacher features")
                zs_target = np.load(domain_dir(features, task["dataset"], task["target"]) / "features.npy")
                out = train_ekda(
                    teacher_model=models["teacher"], student_model=models["student"],
                    classnames=[prompt_name(c) for c in classes], source_dir=shard_dir(params, *source),
                    target_dir=shard_dir(params, task["dataset"], task["target"]), zs_text=zs_text,
                    source_zs_features=source_plain, ekda=d["ekda"],
                    loss=build_distill_loss(d["loss"], n_classes=len(classes), feature_dim=zs_text.shape[1]),
                    refiner=refiner(softmax_np(logits(zs_target, zs_text, scale))), **common, **student_args)
                class_vectors = out["class_vectors"]
            else:
                classnames = [prompt_name(c) for c in classes]
                naive = zero_shot_vectors(models["teacher"], classnames, [d["dapl"]["naive_template"]], device=device)
                probs = naive_probabilities(target_feats, naive, scale=scale, temperature=d["dapl"]["temperature"])
                knn = refiner(probs)
                source = task["dataset"], task["source"]
                s_keys = domain_keys(features, *source)
                out = train_dapl(
                    model=models["teacher"], classnames=classnames, domains=(task["source"], task["target"]),
                    source_features=np.load(domain_dir(features, *source) / "features.npy"),
                    source_labels=source_labels(params, task, s_keys), target_keys=target_keys,
                    target_features=target_feats, naive_probs=knn.refine_all() if knn else probs, dapl=d["dapl"],
                    **common)
                class_vectors = None
            identities = {role: m.identity for role, m in models.items()}
            atomic_torch_save(tmp / name / "student.pt", {
                "method": method, "state": out["state"], "classes": classes, "logit_scale": scale,
                "class_vectors": None if class_vectors is None else torch.from_numpy(np.asarray(class_vectors)),
                "models": identities, "cached_teacher": meta["model"], "distill": d, "task": task})
            atomic_save_npy(tmp / name / "predictions.npy", out["predictions"])
            atomic_write_json(tmp / name / "keys.json", out["keys"])
            atomic_write_json(tmp / name / "train_log.json", {
                "method": method, "loss": d["loss"]["name"], "refine_knn": d["refine_knn"],
                "trainable_params": out["trainable_params"], "epochs": out["log"]})
            return out["log"][-1]

        run_stage_items(STAGE, params, params["tasks"], work, label=task_label(params))
    record_run(params, STAGE)


if __name__ == "__main__":
    main()
