"""DAPL: domain adaptation via prompt learning, on a frozen CLIP.

Ge et al., "Domain Adaptation via Prompt Learning", TNNLS 2023 (``LeapLabTHU/DAPrompt``).

Prompt of class k in domain d: ``[SOS][v_1..v_n domain-agnostic][d_1..d_m of domain d] {class}, a {domain}
image.`` Logits are s * f @ t^T over one block of C columns per domain, the softmax of every loss is taken
within one block. Loss = CE(source block, y) + U * masked-mean CE(target block, y_hat), where y_hat is the
arg-max of the frozen naive prompt's softmax(z/T) (optionally kNN-refined) and the mask keeps confidences
>= tau. A batch where nothing passes tau contributes 0 (the original divides by zero and yields NaN); the
count is logged. Inference uses the target block.

Only text prompts learn and the image encoder is frozen. With ``augment: dassl`` (the original's random crop
and flip) every step encodes its train views with the frozen encoder; with ``augment: none`` image features
come from the features stage's cache (eval transform), which makes each step a text-tower pass. The naive
pseudo-labels are computed once, from the cached target features.
The original's quirks (amp-only, cosine stepped per iteration) are fixed: the cosine is stepped per epoch.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.data.shards import image_loader
from pipeline.data.transforms import TRAIN_TRANSFORMS
from pipeline.features.cache import softmax_np, zero_shot_vectors
from pipeline.methods import param_counts
from pipeline.methods.base import Method, MethodResult, TaskJob
from pipeline.methods.classifiers import CosineClassifier
from pipeline.methods.shared import EndlessBatches, KeyedRows, train_views
from pipeline.methods.training import Prediction, Step, fit, seeded, sgd_with_cosine
from pipeline.models.factory import LoadedModel, autocast
from pipeline.models.prompted import PromptTokens, own_parameters, own_state
from pipeline.schema import Block, boolean, integer, number, template, text

PARAMS = Block({
    "n_ctx": integer(1, default=16),          # domain-agnostic context tokens (DAPL: 16)
    "n_domain_ctx": integer(1, default=16),   # domain-specific context tokens, one set per domain (DAPL: 16)
    "class_specific": boolean(default=False),
    "naive_template": template(default="a photo of a {}."),  # frozen prompt that makes the pseudo-labels
    "threshold": number(0.0, default=0.5),    # pseudo-label confidence threshold tau
    "temperature": number(0.0, exclusive_min=True, default=1.0),
    "target_weight": number(0.0, default=1.0),  # U: weight of the masked target CE
    "augment": text(TRAIN_TRANSFORMS, default="dassl"),  # train view (DAPL: Dassl crop + flip); none: cached features
})


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
               deterministic: bool = True, checkpoint_path=None, augmented: dict[str, Any] | None = None
               ) -> MethodResult:
    """Learn DAPL prompts from cached source (labelled) and target (unlabelled) teacher image features.

    ``augmented`` (``source_dir``, ``target_dir``, ``augment``, ``num_workers``) trains on random train views
    instead: every step then encodes its images with the frozen image encoder; the cached target features
    still give the per-epoch predictions and the naive pseudo-labels (looked up by key).
    """
    scale, precision = model.logit_scale, model.spec.precision
    model.model.to(device)
    with seeded(seed, deterministic=deterministic) as generator:
        prompts = make_prompts(model.model, model.tokenizer, classnames, list(domains), dapl).to(device)
    fs, ys = torch.from_numpy(source_features).float().to(device), torch.from_numpy(source_labels).long().to(device)
    ft, pt = torch.from_numpy(target_features).float().to(device), torch.from_numpy(naive_probs).float().to(device)
    trainable = prompts.trainable_parameters()
    optimizer, scheduler = sgd_with_cosine(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                           epochs=epochs)
    target = {"order": torch.randperm(len(ft), generator=generator), "pos": 0}
    naive_labels = naive_probs.argmax(1)

    def cached_batches(_epoch: int):
        source_order = torch.randperm(len(fs), generator=generator)
        for i in range(0, len(source_order), batch_size):  # epoch = number of source batches
            s_idx = source_order[i:i + batch_size].to(device)
            if target["pos"] + len(s_idx) > len(target["order"]):  # exhausted: restart the target iterator
                target["order"], target["pos"] = torch.randperm(len(ft), generator=generator), 0
            t_idx = target["order"][target["pos"]:target["pos"] + len(s_idx)].to(device)
            target["pos"] += len(s_idx)
            yield fs[s_idx], ys[s_idx], ft[t_idx], pt[t_idx]

    def step(batch, _it):
        f_s, y_s, f_t, p_t = batch
        with autocast(precision, device):
            text = prompts().float()
        source_ce = F.cross_entropy(scale * f_s @ text[0].t(), y_s)
        target_ce, kept = masked_pseudo_label_ce(scale * f_t @ text[1].t(), p_t, dapl["threshold"])
        value = source_ce + dapl["target_weight"] * target_ce
        return value, {"loss": value.item(), "source_ce": source_ce.item(), "pseudo_labels_kept": kept / len(f_t)}

    def predict() -> Prediction:
        prompts.eval()
        with torch.no_grad(), autocast(precision, device):
            text = prompts().float()
        # the teacher of DAPL's target loss: the frozen naive prompt's pseudo-labels (before the threshold)
        return Prediction(target_keys, (ft @ text[1].t()).argmax(1).cpu().numpy(), reference=naive_labels)

    state = lambda: {"prompts": prompts.trainable_state()}  # noqa: E731
    batches, resumable = cached_batches, {"generator": generator, "target": target}
    if augmented is not None:
        batches, resumable["targets"] = _augmented_batches(
            model, naive=KeyedRows(target_keys, naive_probs, "naive pseudo-labels"), batch_size=batch_size,
            seed=seed, device=device, **augmented)
    out = fit(where="dapl", epochs=epochs, batches=batches, steps=[Step("prompts", step, optimizer, scheduler)],
              predict=predict, state=state, train_mode=prompts.train, n_classes=len(classnames),
              collapse_fraction=collapse_fraction, checkpoint_path=checkpoint_path,
              modules={"prompts": prompts}, resumable=resumable)
    prompts.eval()
    with torch.no_grad(), autocast(precision, device):
        target_vectors = prompts()[1].float().cpu().numpy()  # inference: the target block only
    return MethodResult(keys=out["keys"], predictions=out["predictions"], log=out["log"], state=state(),
                        trainable_params=sum(p.numel() for p in trainable), class_vectors=target_vectors)


def _augmented_batches(model: LoadedModel, *, naive: KeyedRows, source_dir, target_dir, augment: str,
                       num_workers: int, batch_size: int, seed: int, device: str):
    """Batches of frozen image features of random train views (source feats, labels, target feats, naive
    probs), and the target stream (its position is resume state)."""
    views = train_views(model, augment, device)

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(model.spec.precision, device):
            return F.normalize(model.model.encode_image(images.to(device)).float(), dim=-1)

    target_iter = EndlessBatches(target_dir, batch_size=batch_size, seed=seed + 7919, with_labels=False,
                                  num_workers=num_workers, **views)  # an epoch is one pass over the source

    def batches(epoch: int):
        for _, images, labels in image_loader(source_dir, batch_size=batch_size, shuffle=True, seed=seed,
                                              epoch=epoch, with_labels=True, num_workers=num_workers, **views):
            t_keys, t_images = next(target_iter)
            yield encode(images), labels.to(device), encode(t_images), naive(t_keys).to(device)

    return batches, target_iter


def make_prompts(clip, tokenizer, classnames: list[str], domains: list[str], dapl: dict[str, Any]) -> DaplPrompts:
    return DaplPrompts(clip, tokenizer, classnames, domains, n_ctx=dapl["n_ctx"], n_domain_ctx=dapl["n_domain_ctx"],
                       class_specific=dapl["class_specific"])


def naive_probabilities(target_features: np.ndarray, naive_vectors: np.ndarray, *, scale: float,
                        temperature: float) -> np.ndarray:
    """softmax(s * f @ t_naive^T / T): the frozen naive prompt's pseudo-label distribution."""
    return softmax_np(scale * target_features @ naive_vectors.T / temperature).astype(np.float32)


def run(job: TaskJob) -> MethodResult:
    # DAPL has no source teacher: both domains' features are the frozen CLIP's own (the features stage's
    # domain features), whatever visual prompts the prompts stage trained. Mixing them fails: an IVLP teacher's
    # visual prompts are co-trained with its deep text prompts, and scored against the plain text encoder they
    # took the smoke DAPL from 47 % to 24 % target accuracy.
    d, block, teacher = job.distill, job.block, job.models["teacher"]
    target_features = job.domain_features("target")
    naive = zero_shot_vectors(teacher, job.classnames, [block["naive_template"]], device=job.device)
    probs = naive_probabilities(target_features, naive, scale=job.logit_scale, temperature=block["temperature"])
    knn = job.knn_refiner(probs)
    return _train(job, d, block, teacher, target_features, knn.refine_all() if knn else probs)


def _train(job: TaskJob, d: dict, block: dict, teacher: LoadedModel, target_features: np.ndarray,
           naive_probs: np.ndarray) -> MethodResult:
    return train_dapl(
        model=teacher, classnames=job.classnames, domains=(job.task["source"], job.task["target"]),
        source_features=job.domain_features("source"), source_labels=job.source_labels(job.domain_keys("source")),
        target_keys=job.domain_keys("target"), target_features=target_features,
        naive_probs=naive_probs, dapl=block, epochs=d["epochs"], batch_size=d["batch_size"],
        lr=d["lr"], momentum=d["momentum"], weight_decay=d["weight_decay"], seed=job.seed, device=job.device,
        collapse_fraction=d["collapse_fraction"], deterministic=job.deterministic,
        checkpoint_path=job.checkpoint_path,
        augmented=None if block["augment"] == "none" else {
            "source_dir": job.shard_dir("source"), "target_dir": job.shard_dir("target"),
            "augment": block["augment"], "num_workers": job.num_workers})


def parameter_counts(params: dict[str, Any], n_classes: int) -> list[dict[str, Any]]:
    name = params["model"]["teacher"]["name"]
    clip = param_counts.meta_model(name)
    with torch.device("meta"):
        prompts = make_prompts(clip, param_counts.meta_tokenizer(name), param_counts.CLASS_NAMES * n_classes,
                               ["source", "target"], params["distill"]["dapl"])
    return [{"part": "domain-agnostic + 2 domain-specific contexts", "model": name,
             **param_counts.count(prompts, prompts.trainable_parameters(), clip)}]


def classifier(state: dict[str, Any], config: dict[str, Any], base: LoadedModel) -> CosineClassifier:
    """The shipped model: the frozen teacher image encoder against the learnt target-domain class vectors,
    fixed after training."""
    return CosineClassifier(base.model.visual, state["class_vectors"], config["logit_scale"],
                            precision=config["base"]["precision"]).eval()


METHOD = Method(name="dapl", summary="domain-specific text prompts on the teacher itself (no student)",
                params=PARAMS, roles=("teacher",), run=run, parameter_counts=parameter_counts,
                classifier=classifier, base_role="teacher")
