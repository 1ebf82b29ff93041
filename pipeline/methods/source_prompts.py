"""Source prompt pretraining of the teacher: CoOp-style learnable text context on a frozen CLIP.

The image encoder is frozen and images get the model's deterministic eval transform, so the source image
features are computed once and every epoch only runs the text tower over the C class prompts (the cost
that CoOp#12 reports running out of memory on is the text encoder, not the images).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm import tqdm

from pipeline.features.cache import encode_shards
from pipeline.methods.common import check_finite, seeded, sgd_with_cosine
from pipeline.models.factory import LoadedModel, autocast
from pipeline.models.prompted import PromptedTextEncoder


def train_source_prompts(*, teacher: LoadedModel, classnames: list[str], shard_dir: str | Path, template: str,
                         n_ctx: int, init: str, class_specific: bool, epochs: int, batch_size: int, lr: float,
                         momentum: float, weight_decay: float, seed: int, device: str, num_workers: int = 0,
                         deterministic: bool = True) -> dict[str, Any]:
    """Learn the teacher's text context on labelled source shards with cross-entropy.

    Returns ``{"contexts": [E, n_ctx, width] tensor (one per epoch, last = reported; [E, C, n_ctx, width]
    when ``class_specific``), "log": [...]}``.
    """
    teacher.model.to(device)
    _, feats, labels = encode_shards(teacher.model.encode_image, shard_dir, transform=teacher.preprocess,
                                     batch_size=batch_size, device=device, precision=teacher.spec.precision,
                                     with_labels=True, num_workers=num_workers, desc="source features")
    feats, labels = feats.to(device), labels.to(device)
    with seeded(seed, deterministic=deterministic) as generator:
        prompt = PromptedTextEncoder(teacher.model, teacher.tokenizer, classnames, template=template,
                                     n_ctx=n_ctx, init=init, class_specific=class_specific).to(device)
    scale = teacher.logit_scale
    optimizer, scheduler = sgd_with_cosine([prompt.ctx], lr=lr, momentum=momentum, weight_decay=weight_decay,
                                           epochs=epochs)
    contexts, log = [], []
    for epoch in tqdm(range(1, epochs + 1), desc="prompt epochs", unit="epoch"):
        start, total, correct, seen = time.perf_counter(), 0.0, 0, 0
        order = torch.randperm(len(labels), generator=generator).to(device)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            with autocast(teacher.spec.precision, device):
                logits = scale * feats[idx] @ prompt().t()
            loss = F.cross_entropy(logits.float(), labels[idx])
            check_finite(loss, where=f"prompts epoch {epoch}", checkpoint=None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(1) == labels[idx]).sum().item()
            seen += len(idx)
        lr_used = optimizer.param_groups[0]["lr"]
        scheduler.step()
        contexts.append(prompt.ctx.detach().cpu().clone())
        log.append({"epoch": epoch, "loss": total / seen, "source_train_acc": 100.0 * correct / seen,
                    "lr": lr_used, "seconds": time.perf_counter() - start})
    return {"contexts": torch.stack(contexts), "log": log, "n_source": int(len(labels)),
            "logit_scale": scale}

