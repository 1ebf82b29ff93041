"""DAPL: domain adaptation via prompt learning (methods.md section 5), on a frozen CLIP.

Prompt of class k in domain d: ``[SOS][v_1..v_n domain-agnostic][d_1..d_m of domain d] {class}, a {domain}
image.`` Logits are s * f @ t^T over one block of C columns per domain, the softmax of every loss is taken
within one block. Loss = CE(source block, y) + U * masked-mean CE(target block, y_hat), where y_hat is the
arg-max of the frozen naive prompt's softmax(z/T) (optionally kNN-refined) and the mask keeps confidences
>= tau. A batch where nothing passes tau contributes 0 (the original divides by zero and yields NaN); the
count is logged. Inference uses the target block.

Only text prompts learn and the image encoder is frozen, so image features come from the features stage's
cache (deterministic eval transform, like the CoOp teacher), which makes each step a text-tower pass.
The original's quirks (amp-only, cosine stepped per iteration) are fixed: the cosine is stepped per epoch.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from pipeline.methods.common import EpochRecorder, check_finite, seeded, sgd_with_cosine
from pipeline.methods.refine import softmax_np
from pipeline.models.factory import LoadedModel, autocast
from pipeline.models.prompted import PromptTokens, own_parameters, own_state


class DaplPrompts(nn.Module):
    """Domain-agnostic context (shared or class-specific) plus one domain-specific context per domain."""

    def __init__(self, clip: nn.Module, tokenizer, classnames: list[str], domains: list[str], *, n_ctx: int,
                 n_domain_ctx: int, class_specific: bool = False, init_std: float = 0.02):
        super().__init__()
        self.clip = clip
        prefix = " ".join(["X"] * (n_ctx + n_domain_ctx))
        self.blocks = nn.ModuleList(
            PromptTokens(clip, tokenizer, [f"{prefix} {name}, a {domain.replace('_', ' ')} image." for name in classnames],
                         n_ctx=n_ctx + n_domain_ctx, prefix=prefix) for domain in domains)
        width = clip.token_embedding.weight.shape[1]
        shape = (len(classnames), n_ctx, width) if class_specific else (n_ctx, width)
        self.ctx = nn.Parameter(torch.randn(shape) * init_std)
        self.domain_ctx = nn.Parameter(torch.randn(len(domains), n_domain_ctx, width) * init_std)
        self.n_classes = len(classnames)

    def forward(self) -> torch.Tensor:
        """L2-normalised class vectors, [n_domains, C, D]."""
        C = self.n_classes
        generic = self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(C, -1, -1)
        out = []
        for d, block in enumerate(self.blocks):
            domain = self.domain_ctx[d].unsqueeze(0).expand(C, -1, -1)
            out.append(block.encode(torch.cat([generic, domain], dim=1)))
        return torch.stack(out)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return own_parameters(self, self.clip)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return own_state(self, self.clip)


def masked_pseudo_label_ce(logits: torch.Tensor, probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """Mean CE to arg-max ``probs`` over rows whose max probability >= threshold; 0 when no row passes."""
    confidence, pseudo = probs.max(1)
    mask = confidence >= threshold
    kept = int(mask.sum())
    if kept == 0:
        return logits.sum() * 0.0, 0  # keeps the graph, contributes nothing
    return F.cross_entropy(logits[mask], pseudo[mask]), kept


def train_dapl(*, model: LoadedModel, classnames: list[str], domains: tuple[str, str], source_features: np.ndarray,
               source_labels: np.ndarray, target_keys: list[str], target_features: np.ndarray,
               naive_probs: np.ndarray, dapl: dict[str, Any], epochs: int, batch_size: int, lr: float,
               momentum: float, weight_decay: float, seed: int, device: str, collapse_fraction: float = 1.0,
               deterministic: bool = True, checkpoint_path=None) -> dict[str, Any]:
    """Learn DAPL prompts from cached source (labelled) and target (unlabelled) teacher image features."""
    scale, precision = model.logit_scale, model.spec.precision
    model.model.to(device)
    with seeded(seed, deterministic=deterministic) as generator:
        prompts = DaplPrompts(model.model, model.tokenizer, classnames, list(domains), n_ctx=dapl["n_ctx"],
                              n_domain_ctx=dapl["n_domain_ctx"], class_specific=dapl["class_specific"]).to(device)
    fs, ys = torch.from_numpy(source_features).float().to(device), torch.from_numpy(source_labels).long().to(device)
    ft, pt = torch.from_numpy(target_features).float().to(device), torch.from_numpy(naive_probs).float().to(device)
    trainable = prompts.trainable_parameters()
    optimizer, scheduler = sgd_with_cosine(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                           epochs=epochs)
    recorder = EpochRecorder(n_classes=len(classnames), collapse_fraction=collapse_fraction,
                             checkpoint_path=checkpoint_path, where="dapl")
    target_order, t_pos = torch.randperm(len(ft), generator=generator), 0
    for epoch in tqdm(range(1, epochs + 1), desc="dapl epochs", unit="epoch"):
        prompts.train()
        start, sums, steps, kept_total, seen = time.perf_counter(), {"loss": 0.0, "source_ce": 0.0}, 0, 0, 0
        source_order = torch.randperm(len(fs), generator=generator)
        for i in range(0, len(source_order), batch_size):  # epoch = number of source batches
            s_idx = source_order[i:i + batch_size].to(device)
            if t_pos + len(s_idx) > len(target_order):  # exhausted: restart the target iterator
                target_order, t_pos = torch.randperm(len(ft), generator=generator), 0
            t_idx = target_order[t_pos:t_pos + len(s_idx)].to(device)
            t_pos += len(s_idx)
            with autocast(precision, device):
                text = prompts().float()
            source_ce = F.cross_entropy(scale * fs[s_idx] @ text[0].t(), ys[s_idx])
            target_ce, kept = masked_pseudo_label_ce(scale * ft[t_idx] @ text[1].t(), pt[t_idx], dapl["threshold"])
            loss = source_ce + dapl["target_weight"] * target_ce
            check_finite(loss, where=f"dapl epoch {epoch}", checkpoint=str(checkpoint_path)
                         if checkpoint_path and epoch > 1 else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps, kept_total, seen = steps + 1, kept_total + kept, seen + len(t_idx)
            sums["loss"] += loss.item()
            sums["source_ce"] += source_ce.item()
        lr_used = optimizer.param_groups[0]["lr"]
        scheduler.step()
        prompts.eval()
        with torch.no_grad(), autocast(precision, device):
            text = prompts().float()
        preds = (ft @ text[1].t()).argmax(1).cpu().numpy()
        recorder.add(epoch, target_keys, preds, {
            "epoch": epoch, **{k: v / max(steps, 1) for k, v in sums.items()}, "lr": lr_used,
            "pseudo_labels_kept": round(kept_total / max(seen, 1), 4), "seconds": time.perf_counter() - start},
            state={"prompts": prompts.trainable_state()})
    return {**recorder.result(), "state": {"prompts": prompts.trainable_state()},
            "trainable_params": sum(p.numel() for p in trainable)}


def naive_probabilities(target_features: np.ndarray, naive_vectors: np.ndarray, *, scale: float,
                        temperature: float) -> np.ndarray:
    """softmax(s * f @ t_naive^T / T): the frozen naive prompt's pseudo-label distribution."""
    return softmax_np(scale * target_features @ naive_vectors.T / temperature).astype(np.float32)
