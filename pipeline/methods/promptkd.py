"""PromptKD-style student distillation on unlabelled target images (the second of two stages).

The student is a frozen CLIP image encoder with learnable (deep) visual prompts and a projector into the
teacher's embedding space. It shares the teacher's pre-stored class vectors W_T, so its logits are
z_S = s * norm(P(f_S(x))) @ W_T^T, and it learns only from the cached teacher outputs of the same image
through the distillation loss chosen in params (PromptKD: w * T^2 * KL_numel). No target label is read:
the loaders are built with ``with_labels=False``.
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
from pipeline.losses import DistillLoss
from pipeline.methods.common import EpochRecorder, check_finite, seeded, sgd_with_cosine
from pipeline.models.factory import LoadedModel, autocast
from pipeline.models.prompted import PromptedStudent


class KeyedRows:
    """Rows of a cached array (teacher logits or features) looked up by sample key."""

    def __init__(self, keys: list[str], rows: np.ndarray, what: str = "teacher logits"):
        if len(keys) != len(rows):
            raise ValueError(f"{len(keys)} keys but {len(rows)} rows of {what}")
        self.row, self.what = {k: i for i, k in enumerate(keys)}, what
        self.rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))

    def __call__(self, keys: list[str]) -> torch.Tensor:
        try:
            return self.rows[[self.row[k] for k in keys]]
        except KeyError as exc:
            raise KeyError(f"no cached {self.what} for sample {exc.args[0]!r}: the features stage output does not "
                           f"match the shards (re-run `dvc repro features`)") from None


def build_student(student_model: LoadedModel, *, teacher_dim: int, n_tokens: int, location: str, depth: int,
                  seed: int, deterministic: bool, device: str) -> PromptedStudent:
    depth = depth or len(student_model.model.visual.transformer.resblocks)  # 0: every layer
    with seeded(seed, deterministic=deterministic):
        return PromptedStudent(student_model.model.visual, teacher_dim=teacher_dim, n_tokens=n_tokens,
                               location=location, depth=depth).to(device)


@torch.no_grad()
def predict(student: PromptedStudent, class_vectors: torch.Tensor, logit_scale: float, loss: DistillLoss,
            shard_dir: Path, *, transform, batch_size: int, device: str, precision: str,
            num_workers: int = 0) -> tuple[list[str], np.ndarray]:
    """Keys and predictions over ``shard_dir`` in shard order (no labels read), through the loss's inference rule."""
    student.eval()
    loss.eval()
    keys, feats, _ = encode_shards(student, shard_dir, transform=transform, batch_size=batch_size,
                                   device=device, precision=precision, num_workers=num_workers, desc="predict")
    preds = []
    for chunk in torch.split(feats, 4096):
        chunk = chunk.to(device)
        z = logit_scale * chunk @ class_vectors.to(device).t()
        preds.append(loss.inference_logits(z, chunk).argmax(1).cpu())
    return keys, torch.cat(preds).numpy()


def distill_promptkd(*, student_model: LoadedModel, class_vectors: np.ndarray, logit_scale: float,
                     teacher_logits: KeyedRows, teacher_features: KeyedRows | None, loss: DistillLoss,
                     shard_dir: str | Path, epochs: int, batch_size: int, lr: float, momentum: float,
                     weight_decay: float, n_tokens: int, location: str, depth: int, seed: int, device: str,
                     collapse_fraction: float = 1.0, num_workers: int = 0, deterministic: bool = True,
                     checkpoint_path: str | Path | None = None, eval_batch_size: int = 128) -> dict[str, Any]:
    """Train the student; return its trainable state, per-epoch target predictions and a training log.

    ``teacher_logits`` may be kNN-refined upstream (:mod:`pipeline.methods.refine`). After every epoch the
    student predicts every target image (shard order) so the evaluate stage can score each epoch without
    this stage touching labels; :class:`EpochRecorder` guards against collapse and keeps the last good
    checkpoint.
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
    recorder = EpochRecorder(n_classes=W.shape[0], collapse_fraction=collapse_fraction,
                             checkpoint_path=checkpoint_path, where="promptkd distill")
    for epoch in tqdm(range(1, epochs + 1), desc="distill epochs", unit="epoch"):
        student.train()
        loss.train()
        student.encoder.visual.eval()  # frozen backbone: keep its dropout/norm layers in eval mode
        start, total, agree, seen = time.perf_counter(), 0.0, 0, 0
        loader = image_loader(shard_dir, transform=transform, batch_size=batch_size, shuffle=True, seed=seed,
                              epoch=epoch, with_labels=False, num_workers=num_workers)
        for batch_keys, images in tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False):
            if len(batch_keys) < 2:  # BatchNorm in the projector needs two samples
                continue
            z_t = teacher_logits(batch_keys).to(device)
            f_t = teacher_features(batch_keys).to(device) if teacher_features is not None else None
            with autocast(precision, device):
                f_s = student.embed(images.to(device))
            z_s = logit_scale * torch.nn.functional.normalize(f_s.float(), dim=-1) @ W.t()
            value, _ = loss(z_s, z_t, f_s=f_s.float(), f_t=f_t, class_centers=W)
            check_finite(value, where=f"distill epoch {epoch}", checkpoint=str(checkpoint_path) if checkpoint_path
                         and epoch > 1 else None)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total += value.item() * len(batch_keys)
            agree += (z_s.argmax(1) == z_t.argmax(1)).sum().item()
            seen += len(batch_keys)
        lr_used = optimizer.param_groups[0]["lr"]
        scheduler.step()
        keys, preds = predict(student, W, logit_scale, loss, shard_dir, transform=transform,
                              batch_size=eval_batch_size, device=device, precision=precision,
                              num_workers=num_workers)
        recorder.add(epoch, keys, preds, {
            "epoch": epoch, "loss": total / max(seen, 1), "train_agreement_with_teacher": 100.0 * agree / max(seen, 1),
            "lr": lr_used, "seconds": time.perf_counter() - start}, state=_state(student, loss))
    return {**recorder.result(), "state": _state(student, loss), "trainable_params": sum(p.numel() for p in trainable)}


def _state(student: PromptedStudent, loss: DistillLoss) -> dict[str, Any]:
    return {"student": student.trainable_state(), "loss": {k: v.detach().cpu() for k, v in loss.state_dict().items()}}
