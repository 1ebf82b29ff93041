"""Source prompt pretraining of the teacher: any kind of :mod:`pipeline.methods.prompt_kinds` (CoOp, CoCoOp,
VPT, IVLP, MaPLe, PromptSRC), CE on the labelled source.

Optional PromptSRC-style self-regularisation (SCL) ties the prompted teacher to the frozen zero-shot
model: L1 to the zero-shot text vectors (a template ensemble) and image features, and KL_numel to the
zero-shot logits; optional Gaussian prompt aggregation (GPA) averages the per-epoch prompts with weights
N(epoch; mean, std). The same teacher step serves EKDA (:mod:`pipeline.methods.ekda`).

With text prompts only and ``augment: none``, the image encoder is frozen and images get the model's
deterministic eval transform, so the source image features are computed once and every step only runs the
text tower over the C class prompts (B x C prompts for CoCoOp, whose context depends on the image). A train
view (``augment: dassl``, CoOp's random crop and flip) or visual prompts make every step encode its images.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.nn import functional as F

from pipeline.data.shards import image_loader
from pipeline.features.cache import encode_shards
from pipeline.losses.kd import kl_divergence
from pipeline.methods.shared import build_teacher, train_views
from pipeline.methods.training import Step, fit, seeded, sgd_with_cosine
from pipeline.models.factory import LoadedModel, autocast

def teacher_step_loss(logits: torch.Tensor, labels: torch.Tensor, *, text: torch.Tensor, image: torch.Tensor,
                      zs_text: torch.Tensor | None, zs_image: torch.Tensor | None, scale: float,
                      text_weight: float, image_weight: float, kl_weight: float
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """CE on source labels + SCL: w_txt*L1(t, t0) + w_img*L1(f, f0) + w_kl*KL_numel(softmax z0 || softmax z).

    ``text``/``image`` are the prompted (normalised) class vectors and image features; ``zs_*`` their frozen
    zero-shot counterparts (needed only when a weight is > 0). L1 is the element mean, as in PromptSRC.
    """
    if text.dim() == 3 and zs_text is not None:  # CoCoOp: class vectors per image, [B, C, D]
        zs_text = zs_text.unsqueeze(0).expand_as(text)
    loss = F.cross_entropy(logits.float(), labels)
    parts = {"ce": loss.item()}
    if (text_weight or kl_weight) and zs_text is None or (image_weight or kl_weight) and zs_image is None:
        raise ValueError("the SCL regulariser needs the zero-shot text vectors and image features")
    terms = {}
    if text_weight:
        terms["l1_text"] = (text_weight, F.l1_loss(text.float(), zs_text.float()))
    if image_weight:
        terms["l1_image"] = (image_weight, F.l1_loss(image.float(), zs_image.float()))
    if kl_weight:
        zs_logits = scale * torch.einsum("bd,...cd->bc", zs_image.float(), zs_text.float())
        terms["kl_zeroshot"] = (kl_weight, kl_divergence(logits, zs_logits, reduction="numel"))
    for name, (weight, value) in terms.items():
        loss = loss + weight * value
        parts[name] = value.item()
    return loss, parts


def gaussian_weights(epochs: int, mean: float, std: float) -> list[float]:
    """GPA weights w_e proportional to N(e; mean, std) for e = 1..epochs."""
    w = [math.exp(-((e - mean) ** 2) / (2 * std ** 2)) for e in range(1, epochs + 1)]
    total = sum(w)
    if total == 0.0:
        raise ValueError(f"prompts.gpa_mean={mean} with gpa_std={std} puts no weight on epochs 1..{epochs}")
    return [x / total for x in w]


def aggregate_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of per-epoch states (floating tensors; others taken from the last state)."""
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            out[key] = sum(w * s[key].float() for w, s in zip(weights, states)).to(last.dtype)
        else:
            out[key] = last.clone()
    return out


def _cached_batches(feats, labels, batch_size, generator) -> Iterator[tuple[None, torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(labels), generator=generator)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        yield None, feats[idx], labels[idx]


def train_source_prompts(*, teacher_model: LoadedModel, classnames: list[str], shard_dir: str | Path,
                         architecture: dict[str, Any], config: dict[str, Any], zs_text: torch.Tensor | None, epochs: int, batch_size: int,
                         lr: float, momentum: float, weight_decay: float, seed: int, device: str,
                         num_workers: int = 0, deterministic: bool = True, checkpoint_path: str | Path | None = None
                         ) -> dict[str, Any]:
    """Learn the teacher's prompts on labelled source shards.

    ``architecture``: the teacher's :class:`pipeline.models.teacher_prompts.PromptedTeacher` keywords;
    ``config`` holds ``augment`` (a train transform kind; absent: none), ``text_weight``, ``image_weight``, ``kl_weight``,
    ``gpa_mean`` (0: off) and ``gpa_std``. Returns per-epoch trainable states, the reported state (GPA
    aggregate or last epoch) and a log. ``checkpoint_path``: the run's snapshot, resumed from when it exists
    (:func:`pipeline.methods.training.fit`).
    """
    model, precision, scale = teacher_model.model.to(device), teacher_model.spec.precision, teacher_model.logit_scale
    with seeded(seed, deterministic=deterministic) as generator:
        teacher = build_teacher(teacher_model, classnames, architecture).to(device)
    visual = teacher.prompted_vision
    augment = config.get("augment", "none")
    cached = not visual and augment == "none"
    zs_text = zs_text.to(device) if zs_text is not None else None
    if cached:  # frozen image encoder, eval view: encode the source once
        _, feats, labels = encode_shards(model.encode_image, shard_dir, transform=teacher_model.preprocess,
                                         batch_size=batch_size, device=device, precision=precision,
                                         with_labels=True, num_workers=num_workers, desc="source features")
        feats, labels = feats.to(device), labels.to(device)
    trainable = teacher.trainable_parameters()
    optimizer, scheduler = sgd_with_cosine(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                           epochs=epochs)
    weights = {k: config[k] for k in ("text_weight", "image_weight", "kl_weight")}
    states, seen = [], {}  # seen: labelled images per epoch

    def batches(epoch: int):
        if cached:
            return _cached_batches(feats, labels, batch_size, generator)
        return ((images, None, y) for _, images, y in image_loader(
            shard_dir, batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch, with_labels=True,
            num_workers=num_workers, **train_views(teacher_model, augment, device)))

    def step(batch, it):
        images, image_feats, y = batch
        y = y.to(device)
        with autocast(precision, device):
            if visual:
                images = images.to(device)
                image_feats = teacher.image_features(images)
                zs_image = None
                if weights["image_weight"] or weights["kl_weight"]:
                    with torch.no_grad():
                        zs_image = F.normalize(model.encode_image(images).float(), dim=-1)
            else:
                if images is not None:  # a train view through the frozen image encoder
                    with torch.no_grad():
                        image_feats = F.normalize(model.encode_image(images.to(device)).float(), dim=-1)
                zs_image = image_feats
            text = teacher.class_vectors(image_feats if teacher.conditional else None)
            logits = teacher.logits(image_feats, scale, class_vectors=text)
        loss, _ = teacher_step_loss(logits, y, text=text, image=image_feats, zs_text=zs_text, zs_image=zs_image,
                                    scale=scale, **weights)
        seen[it.epoch] = seen.get(it.epoch, 0) + len(y)
        return loss, {"loss": loss.item(), "source_train_acc": (logits.argmax(1) == y).float().mean().item() * 100}

    def train_mode() -> None:
        teacher.train()
        model.eval()  # frozen CLIP: its dropout/norm layers stay in eval mode

    out = fit(where="prompts", epochs=epochs, batches=batches, steps=[Step("prompts", step, optimizer, scheduler)],
              predict=None, train_mode=train_mode, epoch_end=lambda _: states.append(teacher.trainable_state()),
              state=lambda: {"teacher": teacher.trainable_state()}, modules={"teacher": teacher},
              checkpoint_path=checkpoint_path, resumable={"generator": generator, "states": states, "seen": seen})
    log, n_source = out["log"], seen[epochs]
    gpa = config["gpa_mean"] > 0
    reported = (aggregate_states(states, gaussian_weights(epochs, config["gpa_mean"], config["gpa_std"]))
                if gpa else states[-1])
    return {"states": states, "reported": reported, "gpa": gpa, "log": log, "n_source": n_source,
            "logit_scale": scale, "trainable_params": sum(p.numel() for p in trainable)}
