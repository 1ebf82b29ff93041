"""PromptKD-style student distillation on unlabelled target images.

The student is a frozen CLIP image encoder with learnable (deep) visual prompts and a projector into the
teacher's embedding space. It shares the teacher's pre-stored class vectors W_T, so its logits are
z_S = s * norm(P(f_S(x))) @ W_T^T, and it learns only from the cached teacher logits of the same image:
L = kd_weight * T^2 * KL(softmax(z_T/T) || softmax(z_S/T)). No target label is read: the loaders are
built with ``with_labels=False``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.shards import image_loader
from pipeline.features.cache import encode_shards
from pipeline.io import atomic_torch_save
from pipeline.losses.kd import kl_divergence
from pipeline.methods.common import check_finite, seeded, sgd_with_cosine
from pipeline.models.factory import LoadedModel, autocast
from pipeline.models.prompted import PromptedStudent


class TeacherLogits:
    """Cached teacher logits looked up by sample key."""

    def __init__(self, keys: list[str], logits: np.ndarray):
        if len(keys) != len(logits):
            raise ValueError(f"{len(keys)} keys but {len(logits)} rows of teacher logits")
        self.row = {k: i for i, k in enumerate(keys)}
        self.logits = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))

    def __call__(self, keys: list[str]) -> torch.Tensor:
        try:
            return self.logits[[self.row[k] for k in keys]]
        except KeyError as exc:
            raise KeyError(f"no cached teacher logits for target sample {exc.args[0]!r}: the features stage "
                           f"output does not match the target shards (re-run `dvc repro features`)") from None


def predict(student: PromptedStudent, class_vectors: torch.Tensor, shard_dir: Path, *, transform,
            batch_size: int, device: str, precision: str, num_workers: int = 0) -> tuple[list[str], np.ndarray]:
    """Keys and arg-max predictions over ``shard_dir`` in shard order (no labels read)."""
    student.eval()
    keys, feats, _ = encode_shards(student, shard_dir, transform=transform, batch_size=batch_size,
                                   device=device, precision=precision, num_workers=num_workers, desc="predict")
    return keys, (feats @ class_vectors.cpu().t()).argmax(1).numpy()


def distill_promptkd(*, student_model: LoadedModel, class_vectors: np.ndarray, logit_scale: float,
                     teacher_logits: TeacherLogits, shard_dir: str | Path, epochs: int, batch_size: int, lr: float,
                     momentum: float, weight_decay: float, kd_weight: float, kd_reduction: str, temperature: float,
                     n_tokens: int, location: str, depth: int, seed: int, device: str, num_workers: int = 0,
                     deterministic: bool = True, checkpoint_path: str | Path | None = None,
                     eval_batch_size: int = 128) -> dict[str, Any]:
    """Train the student; return its trainable state, per-epoch target predictions and a training log.

    After every epoch the student predicts every target image (shard order) so the evaluate stage can score
    each epoch without this stage touching labels; ``checkpoint_path`` (if given) is rewritten each epoch,
    so a divergence keeps the last good one.
    """
    shard_dir = Path(shard_dir)
    W = torch.from_numpy(class_vectors).float().to(device)
    with seeded(seed, deterministic=deterministic):
        student = PromptedStudent(student_model.model.visual, teacher_dim=W.shape[1], n_tokens=n_tokens,
                                  location=location, depth=depth).to(device)
    trainable = student.trainable_parameters()
    optimizer, scheduler = sgd_with_cosine(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                           epochs=epochs)
    precision, transform = student_model.spec.precision, student_model.preprocess
    log, epoch_preds, keys = [], [], None
    for epoch in tqdm(range(1, epochs + 1), desc="distill epochs", unit="epoch"):
        student.train()
        student.encoder.visual.eval()  # frozen backbone: keep its dropout/norm layers in eval mode
        start, total, agree, seen = time.perf_counter(), 0.0, 0, 0
        loader = image_loader(shard_dir, transform=transform, batch_size=batch_size, shuffle=True, seed=seed,
                              epoch=epoch, with_labels=False, num_workers=num_workers)
        for batch_keys, images in tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False):
            if len(batch_keys) < 2:  # BatchNorm in the projector needs two samples
                continue
            z_t = teacher_logits(batch_keys).to(device)
            with autocast(precision, device):
                z_s = logit_scale * student(images.to(device)) @ W.t()
            loss = kd_weight * kl_divergence(z_s.float(), z_t, temperature=temperature, reduction=kd_reduction)
            check_finite(loss, where=f"distill epoch {epoch}",
                         checkpoint=str(checkpoint_path) if checkpoint_path else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch_keys)
            agree += (z_s.argmax(1) == z_t.argmax(1)).sum().item()
            seen += len(batch_keys)
        lr_used = optimizer.param_groups[0]["lr"]
        scheduler.step()
        epoch_keys, preds = predict(student, W, shard_dir, transform=transform, batch_size=eval_batch_size,
                                    device=device, precision=precision, num_workers=num_workers)
        if keys is not None and epoch_keys != keys:  # rows of every epoch must mean the same images
            raise RuntimeError(f"target predictions of epoch {epoch} came in a different order than before")
        keys = epoch_keys
        epoch_preds.append(preds)
        log.append({"epoch": epoch, "loss": total / max(seen, 1), "train_agreement_with_teacher":
                    100.0 * agree / max(seen, 1), "lr": lr_used, "seconds": time.perf_counter() - start})
        if checkpoint_path is not None:
            _save_checkpoint(checkpoint_path, student, epoch)
    return {"state": student.trainable_state(), "keys": keys, "predictions": np.stack(epoch_preds),
            "log": log, "trainable_params": sum(p.numel() for p in trainable)}


def _save_checkpoint(path: str | Path, student: PromptedStudent, epoch: int) -> None:
    atomic_torch_save(path, {"epoch": epoch, "state": student.trainable_state()})
