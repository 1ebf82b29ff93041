"""Building blocks several methods share: the prompted student and teacher, their predictions, cached rows.

The ``make_*`` functions are the one place a model is assembled from its params: training calls them
(seeded, on the item's device) and the parameter counts call them on the meta device, so ``uda-distill
info`` cannot drift from what trains.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.data.shards import image_loader
from pipeline.data.transforms import needed_side, train_transform
from pipeline.features.cache import encode_shards
from pipeline.models.factory import LoadedModel
from pipeline.models.prompted import PromptedStudent
from pipeline.models.teacher_prompts import PromptedTeacher
from pipeline.methods.training import seeded


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


def make_student(visual: nn.Module, *, teacher_dim: int, n_tokens: int, location: str, depth: int
                 ) -> PromptedStudent:
    """The prompted student of ``visual`` (an open_clip ViT); ``depth`` 0 means every layer."""
    depth = depth or len(visual.transformer.resblocks)
    return PromptedStudent(visual, teacher_dim=teacher_dim, n_tokens=n_tokens, location=location, depth=depth)


def build_student(student_model: LoadedModel, *, teacher_dim: int, n_tokens: int, location: str, depth: int,
                  seed: int, deterministic: bool, device: str) -> PromptedStudent:
    """:func:`make_student` with seeded initial prompts, on ``device``."""
    with seeded(seed, deterministic=deterministic):
        return make_student(student_model.model.visual, teacher_dim=teacher_dim, n_tokens=n_tokens,
                            location=location, depth=depth).to(device)


def make_teacher(clip: nn.Module, tokenizer, classnames: list[str], architecture: dict[str, Any]) -> PromptedTeacher:
    """The prompted teacher ``architecture`` describes (:class:`PromptedTeacher` keywords: a prompt kind's,
    :func:`pipeline.methods.prompt_kinds.teacher_architecture`, or EKDA's teacher)."""
    return PromptedTeacher(clip, tokenizer, classnames, **architecture)


def build_teacher(model: LoadedModel, classnames: list[str], architecture: dict[str, Any]) -> PromptedTeacher:
    return make_teacher(model.model, model.tokenizer, classnames, architecture)


@torch.no_grad()
def predict_student(student: PromptedStudent, class_vectors: torch.Tensor, logit_scale: float, loss,
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


def train_views(model: LoadedModel, augment: str, device: str | None = None) -> dict[str, Any]:
    """``image_loader`` keywords for training images of ``model``: its eval transform (``augment: none``) or
    one seeded train view of that kind (:func:`pipeline.data.transforms.train_transform`), the decode size
    they need, and the ``device`` the batches go to (pinned memory on CUDA)."""
    size = needed_side(model.identity["preprocess"], (augment,))  # large JPEGs decode at a reduced scale
    if augment == "none":
        return {"transform": model.preprocess, "decode_size": size, "device": device}
    return {"views": (train_transform(augment, model.identity["preprocess"]),), "decode_size": size,
            "device": device}


class EndlessBatches:
    """Shuffled batches forever, re-shuffled with a new pass seed each pass (the originals' infinite loaders);
    batches smaller than ``min_size`` are dropped (``min_size = batch_size`` is ``drop_last``).

    A method's stream outlives an epoch, so its position (pass, loader batches taken in it) is state a
    resumed run needs (:func:`pipeline.methods.training.fit`'s ``resumable``): after ``load_state_dict``
    the pass is reopened and the batches already taken are drawn again and skipped (passes are seeded per
    sample, so the rest of the pass is the same).
    """

    def __init__(self, shard_dir: Path, *, batch_size: int, seed: int, with_labels: bool, num_workers: int,
                 min_size: int = 1, **views: Any):
        self.loader = dict(shard_dir=shard_dir, batch_size=batch_size, shuffle=True, seed=seed,
                           with_labels=with_labels, num_workers=num_workers, **views)
        self.min_size, self.pass_, self.taken, self._batches = min_size, 1, 0, None

    def __iter__(self) -> "EndlessBatches":
        return self

    def __next__(self):
        while True:
            if self._batches is None:
                self._batches = iter(image_loader(epoch=self.pass_, **self.loader))
                for _ in range(self.taken):
                    next(self._batches)
            for batch in self._batches:
                self.taken += 1
                if len(batch[0]) >= self.min_size:
                    return batch
            self.pass_, self.taken, self._batches = self.pass_ + 1, 0, None

    def state_dict(self) -> dict[str, int]:
        return {"pass": self.pass_, "taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pass_, self.taken, self._batches = state["pass"], state["taken"], None


def loss_state(loss: nn.Module) -> dict[str, torch.Tensor]:
    """The distillation loss's own parameters (only dual_head has any), detached on the CPU."""
    return {k: v.detach().cpu() for k, v in loss.state_dict().items()}
