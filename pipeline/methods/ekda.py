"""EKDA: end-to-end teacher-student alternating distillation (one stage; methods.md section 2).

Every iteration draws a labelled source batch and an unlabelled target batch of the same size:

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

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from pipeline.data.shards import image_loader
from pipeline.losses import DistillLoss
from pipeline.methods.common import EpochRecorder, check_finite, seeded, sgd_with_cosine
from pipeline.methods.promptkd import KeyedRows, build_student, predict
from pipeline.methods.refine import KnnRefiner
from pipeline.methods.source_prompts import build_teacher, teacher_step_loss
from pipeline.models.factory import LoadedModel, autocast


def _target_batches(shard_dir: Path, *, transform, batch_size: int, seed: int, num_workers: int) -> Iterator:
    """Endless shuffled target batches (no labels); each pass re-shuffles with a new epoch seed."""
    epoch = 0
    while True:
        epoch += 1
        for keys, images in image_loader(shard_dir, transform=transform, batch_size=batch_size, shuffle=True,
                                         seed=seed + 7919, epoch=epoch, with_labels=False, num_workers=num_workers):
            if len(keys) >= 2:  # BatchNorm in the projector needs two samples
                yield keys, images


def train_ekda(*, teacher_model: LoadedModel, student_model: LoadedModel, classnames: list[str],
               source_dir: str | Path, target_dir: str | Path, zs_text: np.ndarray, source_zs_features: KeyedRows,
               ekda: dict[str, Any], loss: DistillLoss, epochs: int, batch_size: int, lr: float, momentum: float,
               weight_decay: float, n_tokens: int, location: str, depth: int, seed: int, device: str,
               refiner: KnnRefiner | None = None, collapse_fraction: float = 1.0, num_workers: int = 0,
               deterministic: bool = True, checkpoint_path: str | Path | None = None,
               eval_batch_size: int = 128) -> dict[str, Any]:
    """Train teacher prompts and student together; per-epoch target predictions of the student, and both states."""
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    if student_model.identity["preprocess"] != teacher_model.identity["preprocess"]:
        raise ValueError("EKDA feeds one target batch to teacher and student, so their preprocessing must match: "
                         f"teacher {teacher_model.identity['preprocess']}, student {student_model.identity['preprocess']}")
    scale, t_prec, s_prec = teacher_model.logit_scale, teacher_model.spec.precision, student_model.spec.precision
    config = {"template": ekda["template"], "n_ctx": ekda["n_ctx"], "init": ekda["init"], "class_specific": False,
              "visual_tokens": ekda["visual_tokens"], "visual_location": "middle"}
    teacher_model.model.to(device)
    with seeded(seed, deterministic=deterministic):
        teacher = build_teacher(teacher_model, classnames, config).to(device)
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
    targets = _target_batches(target_dir, transform=student_model.preprocess, batch_size=batch_size, seed=seed,
                              num_workers=num_workers)
    recorder = EpochRecorder(n_classes=len(classnames), collapse_fraction=collapse_fraction,
                             checkpoint_path=checkpoint_path, where="ekda")
    for epoch in tqdm(range(1, epochs + 1), desc="ekda epochs", unit="epoch"):
        start = time.perf_counter()
        sums = {"teacher_loss": 0.0, "student_loss": 0.0, "source_acc": 0.0, "agreement": 0.0}
        steps = 0
        source = image_loader(source_dir, transform=teacher_model.preprocess, batch_size=batch_size, shuffle=True,
                              seed=seed, epoch=epoch, with_labels=True, num_workers=num_workers)
        for s_keys, s_images, s_labels in tqdm(source, desc=f"epoch {epoch}", unit="iter", leave=False):
            t_loss, z = teacher_step(teacher, opt_t, s_images.to(device), s_labels.to(device),
                                     zs_text=zs_text_t, zs_image=source_zs_features(s_keys).to(device), scale=scale,
                                     precision=t_prec, weights=weights, where=f"ekda teacher step, epoch {epoch}",
                                     checkpoint=_kept(checkpoint_path, epoch))
            t_keys, t_images = next(targets)
            s_loss, z_s, z_t = student_step(teacher, student, loss, opt_s, t_images.to(device), scale=scale,
                                            precisions=(t_prec, s_prec), ekda=ekda, keys=t_keys, refiner=refiner,
                                            where=f"ekda student step, epoch {epoch}",
                                            checkpoint=_kept(checkpoint_path, epoch))
            y = s_labels.to(z.device)
            steps += 1
            sums["teacher_loss"] += t_loss.item()
            sums["student_loss"] += s_loss.item()
            sums["source_acc"] += (z.argmax(1) == y).float().mean().item() * 100
            sums["agreement"] += (z_s.argmax(1) == z_t.argmax(1)).float().mean().item() * 100
        lrs = {"lr_teacher": opt_t.param_groups[0]["lr"], "lr_student": opt_s.param_groups[0]["lr"]}
        sched_t.step()
        sched_s.step()
        teacher.eval()
        with torch.no_grad(), autocast(t_prec, device):
            W = teacher.class_vectors().float()
        keys, preds = predict(student, W, scale, loss, target_dir, transform=student_model.preprocess,
                              batch_size=eval_batch_size, device=device, precision=s_prec, num_workers=num_workers)
        recorder.add(epoch, keys, preds, {"epoch": epoch, **{k: v / max(steps, 1) for k, v in sums.items()}, **lrs,
                                          "iterations": steps, "seconds": time.perf_counter() - start},
                     state=_state(teacher, student, loss))
    teacher.eval()
    with torch.no_grad(), autocast(t_prec, device):
        W = teacher.class_vectors().float().cpu().numpy()
    trainable = {"student": sum(p.numel() for p in s_params), "teacher": sum(p.numel() for p in t_params)}
    return {**recorder.result(), "state": _state(teacher, student, loss), "class_vectors": W,
            "trainable_params": trainable["student"] + trainable["teacher"], "trainable_by_part": trainable,
            "teacher_config": config}


def teacher_step(teacher, optimizer, images: torch.Tensor, labels: torch.Tensor, *, zs_text: torch.Tensor,
                 zs_image: torch.Tensor, scale: float, precision: str, weights: dict[str, float], where: str = "",
                 checkpoint: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One teacher update on a labelled source batch; returns the loss and the source logits."""
    teacher.train()
    teacher.clip.eval()  # frozen CLIP: its dropout/norm layers stay in eval mode
    with autocast(precision, images.device.type):
        text = teacher.class_vectors()
        f_t = teacher.image_features(images)
    z = scale * f_t.float() @ text.float().t()
    loss, _ = teacher_step_loss(z, labels, text=text, image=f_t, zs_text=zs_text, zs_image=zs_image, scale=scale,
                                **weights)
    check_finite(loss, where=where, checkpoint=checkpoint)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), z.detach()


def student_step(teacher, student, loss_fn: DistillLoss, optimizer, images: torch.Tensor, *, scale: float,
                 precisions: tuple[str, str], ekda: dict[str, Any], keys: list[str] | None = None,
                 refiner: KnnRefiner | None = None, where: str = "", checkpoint: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One student update on an unlabelled target batch, teacher outputs without gradient.

    Returns the loss, the student logits and the teacher logits.
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
    loss = (kd + ekda["ce_weight"] * F.cross_entropy(z_s, pseudo)
            + ekda["align_weight"] * (g_t - g_s).pow(2).sum(1).mean())
    check_finite(loss, where=where, checkpoint=checkpoint)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), z_s.detach(), z_t


def _kept(checkpoint_path, epoch: int) -> str | None:
    return str(checkpoint_path) if checkpoint_path and epoch > 1 else None


def _state(teacher, student, loss) -> dict[str, Any]:
    return {"teacher": teacher.trainable_state(), "student": student.trainable_state(),
            "loss": {k: v.detach().cpu() for k, v in loss.state_dict().items()}}
