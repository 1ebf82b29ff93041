"""EKDA: end-to-end teacher-student alternating distillation (one stage).

Code: ``1d1x1w/EKDA`` (the trainer class ``EKDA(BaseDA)``; its predecessor ``1d1x1w/CDU``). Every iteration
draws a labelled source batch and an unlabelled target batch of the same size:

* teacher step (source): prompted teacher (text context + shallow "middle" visual prompts) with
  L_T = CE(z, y) + w_txt*L1(t, t0) + w_img*L1(f_T, f0) + w_kl*KL_numel(softmax z0 || softmax z); t0 is the
  zero-shot template ensemble and f0 the plain teacher image features, both cached upstream;
* student step (target): teacher outputs computed without gradient (same student update as the original,
  far less memory), hard arg-max pseudo-labels without threshold (optionally kNN-refined),
  L_S = distillation loss (EKDA: w*T^2*KL_numel) + w_ce*CE(z_S, y_hat) + w_align*mean_i ||g_T,i - g_S,i||^2.

Two SGD optimisers with cosine schedules stepped per epoch; an epoch is one pass over the source batches
(the target iterator restarts when exhausted). Inference: student image encoder + projector against the
teacher's final text class vectors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.data.shards import image_loader
from pipeline.data.transforms import TRAIN_TRANSFORMS
from pipeline.features.cache import encode_shards, logits, softmax_np
from pipeline.losses import DistillLoss, build_distill_loss, loss_schema
from pipeline.methods import param_counts
from pipeline.methods.base import Method, MethodResult, TaskJob
from pipeline.methods.classifiers import prompted_student_classifier
from pipeline.methods.refine import KnnRefiner
from pipeline.methods.shared import (KeyedRows, build_student, build_teacher, loss_state, make_student,
                                     EndlessBatches, predict_student, train_views)
from pipeline.methods.source_prompts import teacher_step_loss
from pipeline.methods.training import Prediction, Step, fit, seeded, sgd_with_cosine
from pipeline.models.factory import LoadedModel, autocast
from pipeline.models.prompted import LOCATIONS, PROMPT_INITS
from pipeline.schema import Block, integer, number, template, text

PARAMS = Block({
    "n_tokens": integer(1, default=4),        # student visual prompt tokens (EKDA scripts: 4; README command: 2)
    "location": text(LOCATIONS, default="middle"),  # after the class token (VPT)
    "depth": integer(0, default=0),           # deep prompts at every layer (0)
    "template": template(default="a photo of a {}."),
    "n_ctx": integer(1, default=4),           # teacher text context tokens
    "init": text(PROMPT_INITS, default="random"),  # the original's N(0, 0.02) overwrite of the init words
    "visual_tokens": integer(1, default=4),   # teacher shallow visual prompts (after the class token)
    "teacher_lr": number(0.0, exclusive_min=True, default=0.005),
    "text_weight": number(0.0, default=25.0),  # PromptSRC-style regulariser of the teacher step
    "image_weight": number(0.0, default=10.0),
    "kl_weight": number(0.0, default=1.0),
    "ce_weight": number(0.0, default=1.0),    # student: CE to the teacher's arg-max pseudo-labels (no threshold)
    "align_weight": number(0.0, default=1.0),  # student: squared L2 between normalised teacher and student features
    "augment": text(TRAIN_TRANSFORMS, default="dassl"),  # train view of source and target (EKDA/CDU: Dassl crop + flip)
    "loss": Block(loss_schema(name="kl", weight=100.0, reduction="numel", temperature=1.0)),  # the scripts' KD weight
})


def teacher_config(ekda: dict[str, Any]) -> dict[str, Any]:
    """EKDA's teacher: shared text context and shallow visual prompts after the class token."""
    return {"template": ekda["template"], "n_ctx": ekda["n_ctx"], "init": ekda["init"], "class_specific": False,
            "visual_tokens": ekda["visual_tokens"], "visual_location": "middle"}


def train_ekda(*, teacher_model: LoadedModel, student_model: LoadedModel, classnames: list[str],
               source_dir: str | Path, target_dir: str | Path, zs_text: np.ndarray, source_zs_features: KeyedRows,
               ekda: dict[str, Any], loss: DistillLoss, epochs: int, batch_size: int, lr: float, momentum: float,
               weight_decay: float, n_tokens: int, location: str, depth: int, seed: int, device: str,
               refiner: KnnRefiner | None = None, collapse_fraction: float = 1.0, num_workers: int = 0,
               deterministic: bool = True, checkpoint_path: str | Path | None = None,
               eval_batch_size: int = 128, augment: str = "none") -> MethodResult:
    """Train teacher prompts and student together; per-epoch target predictions of the student, and both states.

    With ``augment`` both steps see random train views, and the zero-shot image features of the teacher's
    regulariser are computed on the same view (one more frozen forward) instead of read from the cache.
    """
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    if student_model.identity["preprocess"] != teacher_model.identity["preprocess"]:
        raise ValueError("EKDA feeds one target batch to teacher and student, so their preprocessing must match: "
                         f"teacher {teacher_model.identity['preprocess']}, student {student_model.identity['preprocess']}")
    scale, t_prec, s_prec = teacher_model.logit_scale, teacher_model.spec.precision, student_model.spec.precision
    teacher_model.model.to(device)
    with seeded(seed, deterministic=deterministic):
        teacher = build_teacher(teacher_model, classnames, teacher_config(ekda)).to(device)
    student = build_student(student_model, teacher_dim=zs_text.shape[1], n_tokens=n_tokens, location=location,
                            depth=depth, seed=seed, deterministic=deterministic, device=device)
    loss = loss.to(device)
    zs_text_t = torch.from_numpy(zs_text).float().to(device)
    if loss.head is not None:  # dual_head: start the CE head at the zero-shot classifier
        loss.init_head(zs_text_t, scale)
    t_params, s_params = teacher.trainable_parameters(), student.trainable_parameters() + list(loss.parameters())
    opt_t, sched_t = sgd_with_cosine(t_params, lr=ekda["teacher_lr"], momentum=momentum, weight_decay=weight_decay,
                                     epochs=epochs)
    opt_s, sched_s = sgd_with_cosine(s_params, lr=lr, momentum=momentum, weight_decay=weight_decay, epochs=epochs)
    weights = {k: ekda[k] for k in ("text_weight", "image_weight", "kl_weight")}
    targets = EndlessBatches(target_dir, batch_size=batch_size, seed=seed + 7919, with_labels=False,
                              num_workers=num_workers, min_size=2,  # BatchNorm in the projector needs two samples
                              **train_views(student_model, augment, device))

    def batches(epoch: int):
        for source in image_loader(source_dir, batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch,
                                   with_labels=True, num_workers=num_workers,
                                   **train_views(teacher_model, augment, device)):
            yield source, next(targets)

    def zero_shot_image(keys: list[str], images: torch.Tensor) -> torch.Tensor:
        if augment == "none":
            return source_zs_features(keys).to(device)
        with torch.no_grad(), autocast(t_prec, device):  # the cache holds the eval view only
            return F.normalize(teacher_model.model.encode_image(images).float(), dim=-1)

    def teacher_step(batch, _it):
        (s_keys, s_images, s_labels), _ = batch
        y, images = s_labels.to(device), s_images.to(device)
        value, z = teacher_loss(teacher, images, y, zs_text=zs_text_t, zs_image=zero_shot_image(s_keys, images),
                                scale=scale, precision=t_prec, weights=weights)
        return value, {"teacher_loss": value.item(), "source_acc": (z.argmax(1) == y).float().mean().item() * 100}

    def student_step(batch, _it):
        _, (t_keys, t_images) = batch
        value, z_s, z_t = student_loss(teacher, student, loss, t_images.to(device), scale=scale,
                                       precisions=(t_prec, s_prec), ekda=ekda, keys=t_keys, refiner=refiner)
        return value, {"student_loss": value.item(),
                       "agreement": (z_s.argmax(1) == z_t.argmax(1)).float().mean().item() * 100}

    def final_class_vectors() -> torch.Tensor:
        teacher.eval()
        with torch.no_grad(), autocast(t_prec, device):
            return teacher.class_vectors().float()

    def predict() -> Prediction:
        text = final_class_vectors()
        keys, preds = predict_student(student, text, scale, loss, target_dir, transform=student_model.preprocess,
                                      batch_size=eval_batch_size, device=device, precision=s_prec,
                                      num_workers=num_workers)
        # The reference is the teacher as it is now (it keeps learning), whose arg-max makes the student's
        # pseudo-labels (before any kNN refinement); one more teacher pass over the target per epoch.
        t_keys, g_t, _ = encode_shards(teacher.image_features, target_dir, transform=teacher_model.preprocess,
                                       batch_size=eval_batch_size, device=device, precision=t_prec,
                                       num_workers=num_workers, desc="teacher predict")
        if t_keys != keys:
            raise RuntimeError("ekda: teacher and student predictions came in a different image order")
        return Prediction(keys, preds, reference=(g_t.to(device) @ text.t()).argmax(1).cpu().numpy())

    state = lambda: {"teacher": teacher.trainable_state(), "student": student.trainable_state(),  # noqa: E731
                     "loss": loss_state(loss)}
    out = fit(where="ekda", epochs=epochs, batches=batches, predict=predict, state=state,
              steps=[Step("teacher", teacher_step, opt_t, sched_t), Step("student", student_step, opt_s, sched_s)],
              n_classes=len(classnames), collapse_fraction=collapse_fraction, checkpoint_path=checkpoint_path,
              modules={"teacher": teacher, "student": student, "loss": loss},
              resumable={"targets": targets, **({"refiner": refiner} if refiner is not None else {})})
    trainable = {"student": sum(p.numel() for p in s_params), "teacher": sum(p.numel() for p in t_params)}
    return MethodResult(keys=out["keys"], predictions=out["predictions"], log=out["log"], state=state(),
                        trainable_params=trainable["student"] + trainable["teacher"],
                        class_vectors=final_class_vectors().cpu().numpy(),
                        checkpoint={"teacher_config": teacher_config(ekda)},
                        log_extra={"trainable_by_part": trainable, "loss": loss.name})


def teacher_loss(teacher, images: torch.Tensor, labels: torch.Tensor, *, zs_text: torch.Tensor,
                 zs_image: torch.Tensor, scale: float, precision: str, weights: dict[str, float]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's loss on a labelled source batch, and its source logits (detached)."""
    teacher.train()
    teacher.clip.eval()  # frozen CLIP: its dropout/norm layers stay in eval mode
    with autocast(precision, images.device.type):
        text = teacher.class_vectors()
        f_t = teacher.image_features(images)
    z = scale * f_t.float() @ text.float().t()
    value, _ = teacher_step_loss(z, labels, text=text, image=f_t, zs_text=zs_text, zs_image=zs_image, scale=scale,
                                 **weights)
    return value, z.detach()


def student_loss(teacher, student, loss_fn: DistillLoss, images: torch.Tensor, *, scale: float,
                 precisions: tuple[str, str], ekda: dict[str, Any], keys: list[str] | None = None,
                 refiner: KnnRefiner | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's loss on an unlabelled target batch, teacher outputs without gradient.

    Returns the loss, the student logits (detached) and the teacher logits.
    """
    device = images.device.type
    teacher.eval()
    with torch.no_grad(), autocast(precisions[0], device):
        text = teacher.class_vectors().float()
        g_t = teacher.image_features(images).float()
    z_t = scale * g_t @ text.t()
    probs = z_t.softmax(1)
    pseudo = (refiner(keys, probs).to(z_t.device) if refiner is not None else probs).argmax(1)
    student.train()
    loss_fn.train()
    student.encoder.visual.eval()
    with autocast(precisions[1], device):
        f_s = student.embed(images).float()
    g_s = F.normalize(f_s, dim=-1)
    z_s = scale * g_s @ text.t()
    kd, _ = loss_fn(z_s, z_t, f_s=f_s, f_t=g_t, class_centers=text)
    value = (kd + ekda["ce_weight"] * F.cross_entropy(z_s, pseudo)
             + ekda["align_weight"] * (g_t - g_s).pow(2).sum(1).mean())
    return value, z_s.detach(), z_t


def run(job: TaskJob) -> MethodResult:
    d, block = job.distill, job.block
    zs_text = job.cached.load(job.cached.zeroshot_vectors)
    zs_target = job.domain_features("target")
    return train_ekda(
        teacher_model=job.models["teacher"], student_model=job.models["student"], classnames=job.classnames,
        source_dir=job.shard_dir("source"), target_dir=job.shard_dir("target"), zs_text=zs_text,
        source_zs_features=KeyedRows(job.domain_keys("source"), job.domain_features("source"), "teacher features"),
        ekda=block, loss=build_distill_loss(block["loss"], n_classes=len(job.classes), feature_dim=zs_text.shape[1]),
        refiner=job.knn_refiner(softmax_np(logits(zs_target, zs_text, job.logit_scale))),
        epochs=d["epochs"], batch_size=d["batch_size"], lr=d["lr"], momentum=d["momentum"],
        weight_decay=d["weight_decay"], seed=job.seed, device=job.device, collapse_fraction=d["collapse_fraction"],
        num_workers=job.num_workers, deterministic=job.deterministic, checkpoint_path=job.checkpoint_path,
        eval_batch_size=job.eval_batch_size,
        **{k: block[k] for k in ("n_tokens", "location", "depth", "augment")})


def parameter_counts(params: dict[str, Any], n_classes: int) -> list[dict[str, Any]]:
    e = params["distill"]["ekda"]
    t_name, s_name = params["model"]["teacher"]["name"], params["model"]["student"]["name"]
    teacher_dim = param_counts.meta_model(t_name).text_projection.shape[-1]
    student = param_counts.meta_model(s_name)
    with torch.device("meta"):
        s = make_student(student.visual, teacher_dim=teacher_dim,
                         **{k: e[k] for k in ("n_tokens", "location", "depth")})
    return [{"part": "teacher prompts (text + visual, middle)", "model": t_name,
             **param_counts.teacher_prompt_counts(params, n_classes, teacher_config(e))},
            {"part": "student (visual prompts + projector)", "model": s_name,
             **param_counts.count(s, s.trainable_parameters(), student.visual)}]


METHOD = Method(name="ekda", summary="teacher (source) and student (target) steps alternate every iteration",
                params=PARAMS, roles=("teacher", "student"), run=run, parameter_counts=parameter_counts,
                classifier=prompted_student_classifier)
