"""Tiny stand-in VLMs pretrained on the bundled digits, for the offline smoke configuration.

Real CLIP weights cannot be downloaded everywhere (CI has no network), and a random tiny CLIP carries no
knowledge, so a smoke result would mean nothing. These stand-ins are trained from scratch, both towers, on
image/caption pairs built from class-name templates ("a photo of the number three."), on domains other than
the tasks' targets: each image is classified against the text embeddings of every class's caption (a
random template per class and step). They are saved as ordinary open_clip ``local-dir:`` checkpoints, which
the normal model-loading path reads.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch.nn import functional as F
from tqdm import tqdm

from pipeline.data.classlists import prompt_name
from pipeline.data.shards import image_loader
from pipeline.methods.common import seed_everything


def _round_robin(loaders):
    """Interleave batches of several domains so every step sees a mix over the epoch."""
    for group in itertools.zip_longest(*loaders):
        yield from (batch for batch in group if batch is not None)


def pretrain_standin(*, arch: str, shard_dirs: list[Path], classnames: list[str], templates: list[str],
                     epochs: int, batch_size: int, lr: float, seed: int, device: str,
                     num_workers: int = 0) -> dict[str, Any]:
    """Train ``arch`` (an open_clip config name) from random init; return the model, its config and a log."""
    seed_everything(seed, deterministic=True)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
    tokenizer = open_clip.get_tokenizer(arch)
    names = [prompt_name(c) for c in classnames]
    # all captions tokenised once: [T, C, L]
    captions = torch.stack([tokenizer([t.format(n) for n in names]) for t in templates]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = sum(-(-_count(d) // batch_size) for d in shard_dirs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                    pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    log = []
    model.train()
    for epoch in tqdm(range(1, epochs + 1), desc=f"stand-in {arch}", unit="epoch"):
        start, total, correct, seen = time.perf_counter(), 0.0, 0, 0
        loaders = [image_loader(d, transform=preprocess, batch_size=batch_size, shuffle=True, seed=seed + i,
                                epoch=epoch, with_labels=True, num_workers=num_workers)
                   for i, d in enumerate(shard_dirs)]
        for _, images, labels in _round_robin(loaders):
            pick = torch.randint(len(templates), (len(names),), generator=gen).to(device)
            tokens = captions[pick, torch.arange(len(names), device=device)]
            img = F.normalize(model.encode_image(images.to(device)), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.t()
            loss = F.cross_entropy(logits, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)  # at most 100, as in CLIP
            total += loss.item() * len(labels)
            correct += (logits.argmax(1).cpu() == labels).sum().item()
            seen += len(labels)
        log.append({"epoch": epoch, "loss": total / seen, "train_acc": 100.0 * correct / seen,
                    "seconds": time.perf_counter() - start})
    model.eval()
    return {"model": model.cpu(), "model_cfg": open_clip.get_model_config(arch), "log": log}


def _count(shard_dir: Path) -> int:
    from pipeline.data.shards import read_manifest

    return int(read_manifest(shard_dir)["n"])
