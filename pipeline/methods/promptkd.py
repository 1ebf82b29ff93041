"""PromptKD-style student distillation on unlabelled target images (the second of two stages).

Zhengli et al., "PromptKD: Unsupervised Prompt Distillation for Vision-Language Models", CVPR 2024
(``zhengli97/PromptKD``, ``trainers/promptkd.py``). The student is a frozen CLIP image encoder with learnable
(deep) visual prompts and a projector into the teacher's embedding space. It shares the teacher's pre-stored
class vectors W_T, so its logits are z_S = s * norm(P(f_S(x))) @ W_T^T, and it learns only from the cached
teacher outputs of the same image through the distillation loss chosen in params (PromptKD: w * T^2 *
KL_numel). No target label is read: the loaders are built with ``with_labels=False``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.shards import image_loader
from pipeline.data.transforms import TRAIN_TRANSFORMS
from pipeline.features.cache import softmax_np
from pipeline.losses import DistillLoss, build_distill_loss, loss_schema
from pipeline.methods import param_counts
from pipeline.methods.base import Method, MethodResult, TaskJob
from pipeline.methods.classifiers import prompted_student_classifier
from pipeline.methods.shared import (KeyedRows, build_student, loss_state, make_student, predict_student,
                                     train_views)
from pipeline.methods.training import Prediction, Step, fit, sgd_with_cosine
from pipeline.models.factory import LoadedModel, autocast
from pipeline.models.prompted import LOCATIONS
from pipeline.schema import Block, integer, text

PARAMS = Block({  # the student's visual prompts (PromptKD: IVLP-style, 4 tokens after the patches, depth 9)
    "n_tokens": integer(0, default=4),
    "location": text(LOCATIONS, default="append"),
    "depth": integer(0, default=9),  # layers with their own prompts (1: shallow; 0: every layer)
    "augment": text(TRAIN_TRANSFORMS, default="dassl"),  # student train view (PromptKD: Dassl random crop + flip)
    "loss": Block(loss_schema(name="kl", weight=1000.0, reduction="numel", temperature=1.0)),  # KD_WEIGHT 1000
})


def distill_promptkd(*, student_model: LoadedModel, class_vectors: np.ndarray, logit_scale: float,
                     teacher_logits: KeyedRows, teacher_features: KeyedRows | None, loss: DistillLoss,
                     shard_dir: str | Path, epochs: int, batch_size: int, lr: float, momentum: float,
                     weight_decay: float, n_tokens: int, location: str, depth: int, seed: int, device: str,
                     collapse_fraction: float = 1.0, num_workers: int = 0, deterministic: bool = True,
                     checkpoint_path: str | Path | None = None, eval_batch_size: int = 128,
                     augment: str = "none") -> MethodResult:
    """Train the student from cached teacher outputs; per-epoch target predictions and its trainable state.

    ``teacher_logits`` may be kNN-refined upstream (:mod:`pipeline.methods.refine`). With ``augment`` the
    student sees a random train view of each image while its target stays the teacher's cached output for
    the eval view (the original runs the teacher online on the same augmented view).
    """
    shard_dir = Path(shard_dir)
    W = torch.from_numpy(class_vectors).float().to(device)
    student = build_student(student_model, teacher_dim=W.shape[1], n_tokens=n_tokens, location=location,
                            depth=depth, seed=seed, deterministic=deterministic, device=device)
    loss = loss.to(device)
    if loss.head is not None:  # dual_head: start the CE head at the teacher's zero-shot classifier
        loss.init_head(W, logit_scale)
    trainable = student.trainable_parameters() + list(loss.parameters())
    optimizer, scheduler = sgd_with_cosine(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                           epochs=epochs)
    precision, transform = student_model.spec.precision, student_model.preprocess

    def batches(epoch: int):
        for keys, images in image_loader(shard_dir, batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch,
                                         with_labels=False, num_workers=num_workers,
                                         **train_views(student_model, augment, device)):
            if len(keys) >= 2:  # BatchNorm in the projector needs two samples
                yield keys, images

    def step(batch, _it) -> tuple[torch.Tensor, dict[str, float]]:
        keys, images = batch
        z_t = teacher_logits(keys).to(device)
        f_t = teacher_features(keys).to(device) if teacher_features is not None else None
        with autocast(precision, device):
            f_s = student.embed(images.to(device))
        z_s = logit_scale * torch.nn.functional.normalize(f_s.float(), dim=-1) @ W.t()
        value, _ = loss(z_s, z_t, f_s=f_s.float(), f_t=f_t, class_centers=W)
        agreement = (z_s.argmax(1) == z_t.argmax(1)).float().mean().item() * 100
        return value, {"loss": value.item(), "train_agreement_with_teacher": agreement}

    def train_mode() -> None:
        student.train()
        loss.train()
        student.encoder.visual.eval()  # frozen backbone: keep its dropout/norm layers in eval mode

    def predict() -> Prediction:
        keys, preds = predict_student(student, W, logit_scale, loss, shard_dir, transform=transform,
                                      batch_size=eval_batch_size, device=device, precision=precision,
                                      num_workers=num_workers)
        # the teacher the student learns from: the arg-max of its (cached, maybe kNN-refined) KD targets
        return Prediction(keys, preds, reference=teacher_logits(keys).argmax(1).numpy())

    state = lambda: {"student": student.trainable_state(), "loss": loss_state(loss)}  # noqa: E731
    out = fit(where="promptkd distill", epochs=epochs, batches=batches, train_mode=train_mode,
              steps=[Step("student", step, optimizer, scheduler)], predict=predict, state=state,
              n_classes=W.shape[0], collapse_fraction=collapse_fraction, checkpoint_path=checkpoint_path,
              modules={"student": student, "loss": loss})
    return MethodResult(keys=out["keys"], predictions=out["predictions"], log=out["log"], state=state(),
                        trainable_params=sum(p.numel() for p in trainable), class_vectors=class_vectors,
                        log_extra={"loss": loss.name})


def run(job: TaskJob) -> MethodResult:
    d, block = job.distill, job.block
    class_vectors = job.cached.load(job.cached.class_vectors)
    target_keys = job.domain_keys("target")
    z_t = job.cached_rows(job.cached.target_logits, "target")
    knn = job.knn_refiner(softmax_np(z_t))
    if knn is not None:  # refined distributions become the KD targets (log-probabilities as logits)
        z_t = np.log(np.clip(knn.refine_all(), 1e-8, None))
    return distill_promptkd(
        student_model=job.models["student"], class_vectors=class_vectors, logit_scale=job.logit_scale,
        teacher_logits=KeyedRows(target_keys, z_t),
        teacher_features=KeyedRows(target_keys, job.teacher_target_features(), "teacher features"),
        loss=build_distill_loss(block["loss"], n_classes=len(job.classes), feature_dim=class_vectors.shape[1]),
        shard_dir=job.shard_dir("target"), epochs=d["epochs"], batch_size=d["batch_size"], lr=d["lr"],
        momentum=d["momentum"], weight_decay=d["weight_decay"], seed=job.seed, device=job.device,
        collapse_fraction=d["collapse_fraction"], num_workers=job.num_workers, deterministic=job.deterministic,
        checkpoint_path=job.checkpoint_path, eval_batch_size=job.eval_batch_size,
        **{k: block[k] for k in ("n_tokens", "location", "depth", "augment")})


def parameter_counts(params: dict[str, Any], n_classes: int) -> list[dict[str, Any]]:
    t_name, s_name = params["model"]["teacher"]["name"], params["model"]["student"]["name"]
    teacher, student = param_counts.meta_model(t_name), param_counts.meta_model(s_name)
    block = params["distill"]["promptkd"]
    with torch.device("meta"):
        s = make_student(student.visual, teacher_dim=teacher.text_projection.shape[-1],
                         **{k: block[k] for k in ("n_tokens", "location", "depth")})
    return [param_counts.source_prompt_row(params, n_classes),
            {"part": "student (visual prompts + projector)", "model": s_name,
             **param_counts.count(s, s.trainable_parameters(), student.visual)}]


def check(params: dict[str, Any], errors: list[str]) -> None:
    block = params["distill"]["promptkd"]
    if block["n_tokens"] == 0 and block["depth"] not in (0, 1):
        errors.append("distill.promptkd.depth: deep prompts need distill.promptkd.n_tokens > 0")


METHOD = Method(name="promptkd", summary="student from the cached source-prompted teacher (two stages)",
                params=PARAMS, roles=("student",), run=run, parameter_counts=parameter_counts,
                classifier=prompted_student_classifier, check=check)
