"""Tiny stand-in VLMs pretrained on the bundled digits, for the offline default configuration (params.yaml).

Real CLIP weights cannot be downloaded everywhere (CI has no network), and a random tiny CLIP carries no
knowledge, so a smoke result would mean nothing. These stand-ins are trained from scratch, both towers, on
image/caption pairs built from class-name templates ("a photo of the number three."), on domains other than
the tasks' targets: each image is classified against the text embeddings of every class's caption (a
random template per class and step). They are saved as ordinary open_clip ``local-dir:`` checkpoints, which
the normal model-loading path reads.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch.nn import functional as F

from pipeline.data.classlists import prompt_name
from pipeline.data.shards import image_loader
from pipeline.methods.training import seeded
from pipeline.progress import progress


@torch.no_grad()
def load_images(shard_dirs: list[Path], transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Every labelled image of ``shard_dirs``, preprocessed, in memory: digits are tiny, and a tiny model
    trains several times faster from a tensor than through the per-sample decode of a loader."""
    images, labels = [], []
    for shard_dir in shard_dirs:
        for _, x, y in image_loader(shard_dir, transform=transform, batch_size=256, shuffle=False,
                                    with_labels=True):
            images.append(x)
            labels.append(y)
    return torch.cat(images), torch.cat(labels)


def pretrain_standin(*, arch: str, shard_dirs: list[Path], classnames: list[str], templates: list[str],
                     epochs: int, batch_size: int, lr: float, seed: int, device: str) -> dict[str, Any]:
    """Train ``arch`` (an open_clip config name) from random init; return the model, its config and a log."""
    with seeded(seed) as gen:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
    tokenizer = open_clip.get_tokenizer(arch)
    names = [prompt_name(c) for c in classnames]
    # every caption tokenised once: [templates, classes, context]
    captions = torch.stack([tokenizer([t.format(n) for n in names]) for t in templates]).to(device)
    images, labels = load_images(shard_dirs, preprocess)
    steps_per_epoch = -(-len(labels) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.1)
    classes = torch.arange(len(names), device=device)
    log = []
    model.train()
    for epoch in progress(range(1, epochs + 1), desc=f"stand-in {arch}", unit="epoch"):
        start, total, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x, y = images[idx].to(device), labels[idx].to(device)
            tokens = captions[torch.randint(len(templates), (len(names),), generator=gen).to(device), classes]
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.t()
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)  # at most 100, as in CLIP
            total += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
        log.append({"epoch": epoch, "loss": total / len(labels), "train_acc": 100.0 * correct / len(labels),
                    "seconds": time.perf_counter() - start})
    model.eval()
    return {"model": model.cpu(), "model_cfg": open_clip.get_model_config(arch), "log": log,
            "n_images": int(len(labels))}
