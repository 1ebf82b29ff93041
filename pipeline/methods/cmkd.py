"""CMKD building blocks: the CLIP model with a task head, the CMKD and FixMatch losses, and one training step.

CMKD ("Unsupervised Domain Adaption Harnessing Vision-Language Pre-training", TCSVT 2024; code
``Wenlve-Zhou/VLP-UDA``) fine-tunes the whole CLIP visual tower f in fp32 with two heads on its features:
the task head h (BN -> LN -> Linear, used at test) and the CLIP head g(x) = s * f^(x) . W^T with the class text
vectors W fixed. g moves with f, so its logits are recomputed every step and cannot be cached. Where the paper
and the code differ, the code is followed (noted at each place). :func:`cmkd_loss` is an iteration's forward
(a ``training.Step`` loss); :func:`cmkd_step` is a whole iteration on its own (update, RST, lr schedule).
"""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.data.shards import image_loader
from pipeline.data.transforms import (TRAIN_TRANSFORMS, decode_size_of, needed_side, strong_transform,
                                      train_transform)
from pipeline.methods import param_counts
from pipeline.methods.base import Method, MethodResult, TaskJob
from pipeline.methods.shared import EndlessBatches
from pipeline.methods.training import Prediction, Step, fit, seeded, update
from pipeline.models.factory import LoadedModel
from pipeline.models.residual import (RstProjection, apply_residual, dsp_counts, frozen_copy, residual_tensors,
                                     save_residual)
from pipeline.schema import Block, boolean, integer, number, template, text


class TaskHead(nn.Sequential):
    """BatchNorm1d(d) with a frozen bias -> LayerNorm(d, eps 1e-6) -> Linear(d, C, no bias), weight ~ N(0, 0.001).

    A Sequential, so its state-dict keys (``0.weight`` ... ``2.weight``) match the original's classifier.
    BN batch statistics depend on what is in the batch: call it once per domain, never on a concatenation.
    """

    def __init__(self, dim: int, n_classes: int):
        super().__init__(nn.BatchNorm1d(dim), nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, n_classes, bias=False))
        nn.init.ones_(self[0].weight)
        nn.init.zeros_(self[0].bias)
        self[0].bias.requires_grad_(False)  # the original's weights_init_classifier freezes it
        nn.init.normal_(self[2].weight, std=0.001)


class CmkdModel(nn.Module):
    """An open_clip CLIP as CMKD trains it: visual tower f (trainable, fp32), task head h, fixed CLIP head g.

    Takes ownership of ``clip.visual`` (it is trained in place; pass a copy to keep the original). The text
    tower is used once, here, to compute W [C, d] from ``template.format(name)`` per class (detached,
    L2-normalised) and is not kept; logit_scale is frozen into the buffer ``scale`` = exp(logit_scale).
    BatchNorm layers inside the visual tower (ResNets) stay in eval mode, as in the original: their running
    statistics are frozen while their affine weights train.
    """

    def __init__(self, clip: nn.Module, tokenizer, classnames: list[str], *, template: str):
        super().__init__()
        if "{}" not in template:
            raise ValueError(f"prompt template {template!r} must contain '{{}}' where the class name goes")
        clip.requires_grad_(False)
        device = clip.logit_scale.device
        with torch.no_grad():
            tokens = tokenizer([template.format(name) for name in classnames]).to(device)
            text = F.normalize(clip.encode_text(tokens).float(), dim=-1)
            self.register_buffer("text_vectors", text.detach())
            self.register_buffer("scale", clip.logit_scale.detach().float().exp())
        self.visual = clip.visual.float().requires_grad_(True)
        self.head = TaskHead(text.shape[1], len(classnames)).to(device)
        self.train()

    def train(self, mode: bool = True) -> "CmkdModel":
        super().train(mode)
        for m in self.visual.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """f(x): image embeddings, not normalised, [B, d]."""
        return self.visual(images.float())

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """h(f(x)) [B, C]. One call per domain (source, target weak, target strong): see :class:`TaskHead`."""
        return self.head(feats)

    def clip_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """g(x) = s * f^(x) . W^T [B, C], with s and W fixed (gradients reach f only)."""
        return self.scale * F.normalize(feats, dim=-1) @ self.text_vectors.t()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr: float, head_multiplier: float) -> list[dict]:
        """Two SGD groups: the visual tower at ``lr``, the head at ``lr * head_multiplier`` (BN bias excluded)."""
        return [{"name": "visual", "params": [p for p in self.visual.parameters() if p.requires_grad], "lr": lr},
                {"name": "head", "params": [p for p in self.head.parameters() if p.requires_grad],
                 "lr": lr * head_multiplier}]


def lr_factor(t: int, *, gamma: float = 3e-4, decay: float = 0.75) -> float:
    """(1 + gamma*t)^-decay: the per-iteration multiplier of every group's lr (LambdaLR, stepped per iteration)."""
    return (1.0 + gamma * t) ** -decay


def cmkd_optimizer(model: CmkdModel, *, lr: float, head_multiplier: float, momentum: float = 0.9,
                   weight_decay: float = 5e-4):
    """SGD (Nesterov) over :meth:`CmkdModel.param_groups` and its per-iteration LambdaLR(:func:`lr_factor`)."""
    optimizer = torch.optim.SGD(model.param_groups(lr, head_multiplier), lr=lr, momentum=momentum,
                                weight_decay=weight_decay, nesterov=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def gini_impurity(probs: torch.Tensor, weights: torch.Tensor | float = 1.0) -> torch.Tensor:
    """sum_i w_i * (1 - sum_k P_ik^2 / sg(sum_j P_jk)): batch-class normalised, summed over the batch."""
    # the class mass is a constant of the step (detached, as in the original); the clamp only stops 0/0
    # when a class's probability underflows to 0 on every row, where the exact term is 0 anyway
    mass = probs.sum(dim=0, keepdim=True).detach().clamp_min(torch.finfo(probs.dtype).tiny)
    return (weights * (1.0 - (probs ** 2 / mass).sum(dim=-1))).sum()


def calibrated_alpha(p_g: torch.Tensor, p_h: torch.Tensor) -> torch.Tensor:
    """alpha_i = sg(exp(-KL(p_g,i || p_h,i))), [B]. The code's direction; the paper's Eq. 11 writes KL(p_h || p_g)."""
    with torch.no_grad():  # xlogy: 0*log(0) = 0 like F.kl_div; p_h = 0 where p_g > 0 gives KL = inf, alpha = 0
        kl = (torch.xlogy(p_g, p_g) - torch.xlogy(p_g, p_h)).sum(dim=-1)
        return torch.exp(-kl)


def warmup_lambda(t: int, *, max_iter: int = 10000, gamma: float = 1.0) -> float:
    """lambda(t) = 2 / (1 + exp(-gamma * min(t, max_iter) / max_iter)) - 1: 0 at t = 0, 0.462 from max_iter on."""
    return 2.0 / (1.0 + math.exp(-gamma * min(t, max_iter) / max_iter)) - 1.0


def cmkd_losses(h_s: torch.Tensor, y_s: torch.Tensor, h_t: torch.Tensor, g_t: torch.Tensor, g_s: torch.Tensor, *,
                t: int, lambdas: tuple[float, float, float], label_smoothing: float, lambda_max_iter: int = 10000
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The CMKD terms as weighted contributions (they sum to the loss), and diagnostics.

    ``h_s``/``g_s``: task/CLIP logits of the source batch, ``y_s`` its labels; ``h_t``/``g_t``: of the target
    batch. Returns ``({cls, task, distill, reg_ce, reg_gini}, {alpha_mean, lambda})``:
    cls = CE_ls(h_s, y_s); task = l1*lam*GI(p_h; alpha); distill = l1*lam*GI((p_h + sg(p_g))/2; 1 - alpha);
    reg_ce = l2*CE(g_s, y_s) (no smoothing, as in the code); reg_gini = l3*lam*GI(p_g; 1), where p_g keeps its
    gradient so the regulariser reaches the encoder through g.
    """
    l1, l2, l3 = lambdas
    lam = warmup_lambda(t, max_iter=lambda_max_iter)  # read before the counter steps: 0 at iteration 0
    p_h, p_g = F.softmax(h_t, dim=-1), F.softmax(g_t, dim=-1)
    alpha = calibrated_alpha(p_g, p_h)
    losses = {
        "cls": F.cross_entropy(h_s, y_s, label_smoothing=label_smoothing),
        "task": l1 * lam * gini_impurity(p_h, alpha),
        "distill": l1 * lam * gini_impurity(0.5 * (p_h + p_g.detach()), 1.0 - alpha),
        "reg_ce": l2 * F.cross_entropy(g_s, y_s),
        "reg_gini": l3 * lam * gini_impurity(p_g),
    }
    return losses, {"alpha_mean": float(alpha.mean()), "lambda": lam}


def fixmatch_losses(h_weak: torch.Tensor, g_weak: torch.Tensor, h_strong: torch.Tensor, g_strong: torch.Tensor, *,
                    threshold: float, weight: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """FixMatch on both heads: ``({fm_h, fm_g}, {mask_h, mask_g})``.

    Pseudo-labels are the arg-max of the weak view's softmax (no gradient), kept where its max >= threshold;
    the masked CE of the strong view is averaged over the FULL batch (an empty mask gives 0, never NaN).
    """
    losses, stats = {}, {}
    for key, weak, strong in (("h", h_weak, h_strong), ("g", g_weak, g_strong)):
        with torch.no_grad():
            confidence, labels = F.softmax(weak, dim=-1).max(dim=-1)
            mask = (confidence >= threshold).to(strong.dtype)
        losses[f"fm_{key}"] = weight * (F.cross_entropy(strong, labels, reduction="none") * mask).mean()
        stats[f"mask_{key}"] = float(mask.mean())
    return losses, stats


def _check_cfg(cfg: dict) -> dict:
    missing = [k for k in DEFAULT_CFG if k not in cfg] + \
        [f"fixmatch.{k}" for k in DEFAULT_CFG["fixmatch"] if k not in cfg.get("fixmatch", {})]
    if missing:
        raise ValueError(f"CMKD cfg lacks {missing}; the original's reported values are {DEFAULT_CFG}")
    return cfg


def cmkd_loss(model: CmkdModel, *, source_images: torch.Tensor, source_labels: torch.Tensor,
              target_weak: torch.Tensor, target_strong: torch.Tensor | None = None, t: int, cfg: dict
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The forward half of an iteration: ``(total loss, {every term, total, diagnostics} as floats)``.

    Fits a :class:`pipeline.methods.training.Step` loss. ``cfg`` keys (all required, see :data:`DEFAULT_CFG`):
    ``lambda1``, ``lambda2``, ``lambda3``, ``label_smoothing``, ``lambda_max_iter`` and
    ``fixmatch: {enabled, threshold, weight}``; ``t`` is the iteration index from 0. Encoder passes: source,
    target weak and (FixMatch) target strong, each followed by its own head call (BN statistics per domain).
    """
    fm = _check_cfg(cfg)["fixmatch"]
    if fm["enabled"] != (target_strong is not None):
        raise ValueError(f"fixmatch.enabled is {fm['enabled']} but target_strong is "
                         f"{'missing' if target_strong is None else 'given'}")
    f_s = model.features(source_images)
    h_s, g_s = model.head_logits(f_s), model.clip_logits(f_s)
    f_t = model.features(target_weak)
    h_t, g_t = model.head_logits(f_t), model.clip_logits(f_t)
    losses, stats = cmkd_losses(h_s, source_labels, h_t, g_t, g_s, t=t, lambdas=(cfg["lambda1"], cfg["lambda2"],
                                cfg["lambda3"]), label_smoothing=cfg["label_smoothing"],
                                lambda_max_iter=cfg["lambda_max_iter"])
    if fm["enabled"]:
        f_st = model.features(target_strong)
        fm_losses, fm_stats = fixmatch_losses(h_t, g_t, model.head_logits(f_st), model.clip_logits(f_st),
                                              threshold=fm["threshold"], weight=fm["weight"])
        losses.update(fm_losses)
        stats.update(fm_stats)
    total = sum(losses.values())
    return total, {**{k: float(v.detach()) for k, v in losses.items()}, "total": float(total.detach()), **stats}


def cmkd_step(model: CmkdModel, optimizer: torch.optim.Optimizer, scheduler, *, source_images: torch.Tensor,
              source_labels: torch.Tensor, target_weak: torch.Tensor, target_strong: torch.Tensor | None = None,
              t: int, cfg: dict, rst=None) -> dict[str, float]:
    """One CMKD iteration in the original's order; returns :func:`cmkd_loss`'s floats plus the ``lr`` used.

    forward + loss (:func:`cmkd_loss`) -> NaN/inf check -> zero_grad -> backward -> optimiser step -> ``rst``
    (a :class:`pipeline.models.residual.RstProjection`) -> ``scheduler.step()``. lambda(t) and the lr schedule
    share one counter, so a given ``scheduler`` must have stepped exactly ``t`` times. A NaN/inf loss raises
    :class:`pipeline.methods.training.TrainingDiverged` before ``backward``: the weights keep their last values.
    """
    if scheduler is not None and scheduler.last_epoch != t:
        raise ValueError(f"t={t} but the lr scheduler has stepped {scheduler.last_epoch} times; lambda(t) and the "
                         f"lr schedule share one iteration counter")
    model.train()
    total, logged = cmkd_loss(model, source_images=source_images, source_labels=source_labels,
                              target_weak=target_weak, target_strong=target_strong, t=t, cfg=cfg)
    logged["lr"] = optimizer.param_groups[0]["lr"]  # the visual group's lr used by this step
    update(optimizer, total, where=f"CMKD iteration {t}", after=None if rst is None else lambda: rst(model.visual))
    if scheduler is not None:
        scheduler.step()
    return logged


# --------------------------------------------------------------------------------- the method in the pipeline

PARAMS = Block({  # the original's Office-Home ViT-B/16 yaml (the reported setting); per-benchmark values in configs/
    "template": template(default="a photo of a {}."),  # one prompt per class for W (Office-Home: "an image of a {}.")
    "lr": number(0.0, exclusive_min=True, default=3e-6),  # visual tower; ResNets: 3e-7
    "head_lr_multiplier": number(0.0, exclusive_min=True, default=1000.0),  # head lr = lr x this (ResNets: 10000)
    "momentum": number(0.0, default=0.9),     # SGD, Nesterov
    "weight_decay": number(0.0, default=5e-4),
    "batch_size": integer(2, default=32),     # per domain (source and target); the original's digits: 64
    "epochs": integer(1, default=20),         # an epoch is iters_per_epoch iterations, then an evaluation
    "iters_per_epoch": integer(1, default=500),
    "lambda1": number(0.0, default=0.25),     # task + distillation Gini terms (DomainNet: 0.025)
    "lambda2": number(0.0, default=0.1),      # regulariser: CE of g on the source
    "lambda3": number(0.0, default=0.025),    # regulariser: Gini of g on the target (DomainNet: 0.0025)
    "label_smoothing": number(0.0, maximum=1.0, default=0.1),
    "lambda_max_iter": integer(1, default=10000),  # lambda(t) stops growing here (0.462), whatever the run length
    "augment": text(TRAIN_TRANSFORMS, default="cmkd"),  # train view: cmkd (Resize 256 -> RandomCrop -> flip), VisDA: cmkd_visda
    "fixmatch": Block({"enabled": boolean(default=False), "threshold": number(0.0, maximum=1.0, default=0.95),
                       "weight": number(0.0, default=0.5)}),  # VisDA 0.80 / 2.0, DomainNet 0.95 / 0.1 (appendix B)
    "rst": Block({"enabled": boolean(default=False),
                  "threshold": number(0.0, default=1e-6)}),  # tau: reported rows 1e-6 (VisDA ViT 1e-7); code 1e-5
})

ZEROSHOT_NOTE = "zero-shot CLIP head g with the pretrained encoder (the paper's CLIP rows)"
EXTRA_NOTES = {"clip_zeroshot": ZEROSHOT_NOTE,
               "clip_adapted": "not in the paper: CLIP head g with the adapted encoder",
               "head_plus_clip": "not in the paper: mean of the task head's and g's probabilities"}


def make_model(clip: nn.Module, tokenizer, classnames: list[str], block: dict) -> CmkdModel:
    return CmkdModel(clip, tokenizer, classnames, template=block["template"])


def _loop_cfg(block: dict) -> dict:
    return {k: block[k] for k in ("lambda1", "lambda2", "lambda3", "label_smoothing", "lambda_max_iter", "fixmatch")}


# What cmkd_step / cmkd_loss read, at the reported (Office-Home) values; they require every key, none is filled in.
DEFAULT_CFG = _loop_cfg(PARAMS.defaults())


@torch.no_grad()
def _predict(model: CmkdModel, shard_dir, *, transform, batch_size: int, device: str, num_workers: int
             ) -> tuple[list[str], dict[str, np.ndarray]]:
    """Keys and the arg-max of h, g and their probability mean over every target image (shard order, no labels)."""
    model.eval()
    keys, preds = [], {"head": [], "clip": [], "head_plus_clip": []}
    for batch_keys, images in image_loader(shard_dir, transform=transform, batch_size=batch_size, shuffle=False,
                                           with_labels=False, num_workers=num_workers,
                                           decode_size=decode_size_of(transform), device=device):
        f = model.features(images.to(device))
        h, g = model.head_logits(f), model.clip_logits(f)
        keys.extend(batch_keys)
        preds["head"].append(h.argmax(1).cpu())
        preds["clip"].append(g.argmax(1).cpu())
        preds["head_plus_clip"].append((F.softmax(h, 1) + F.softmax(g, 1)).argmax(1).cpu())
    return keys, {k: torch.cat(v).numpy() for k, v in preds.items()}


def run(job: TaskJob) -> MethodResult:
    """Fine-tune a copy of the student CLIP's visual tower on one task, in fp32 whatever model.student.precision
    says (the original disables CLIP's fp16 weights too); the loaded student is left untouched."""
    block, device, student = job.block, job.device, job.models["student"]
    with seeded(job.seed, deterministic=job.deterministic):  # the head's initial weights
        model = make_model(copy.deepcopy(student.model), student.tokenizer, job.classnames, block).to(device)
    optimizer, scheduler = cmkd_optimizer(model, lr=block["lr"], head_multiplier=block["head_lr_multiplier"],
                                          momentum=block["momentum"], weight_decay=block["weight_decay"])
    base = frozen_copy(model.visual, device=device)  # theta0: RST, the residual and the DSP count
    rst = RstProjection(base, block["rst"]["threshold"]) if block["rst"]["enabled"] else None
    cfg, fixmatch = _loop_cfg(block), block["fixmatch"]["enabled"]
    weak = train_transform(block["augment"], student.identity["preprocess"])
    views = (weak, strong_transform(student.identity["preprocess"], visda=block["augment"] == "cmkd_visda")) \
        if fixmatch else (weak,)
    bs, workers = block["batch_size"], job.num_workers
    # the shorter side the views need (their Resize), so large JPEGs decode at a reduced scale
    size = needed_side(student.identity["preprocess"], (block["augment"],))
    sources = EndlessBatches(job.shard_dir("source"), batch_size=bs, seed=job.seed, with_labels=True,
                              num_workers=workers, min_size=bs, views=(weak,), decode_size=size,
                              device=device)
    targets = EndlessBatches(job.shard_dir("target"), batch_size=bs, seed=job.seed + 7919, with_labels=False,
                              num_workers=workers, min_size=bs, views=views, decode_size=size,
                              device=device)

    def batches(_epoch: int):
        for _ in range(block["iters_per_epoch"]):
            yield next(sources), next(targets)

    def step(batch, it):
        (_, x_s, y_s), (_, x_t) = batch
        weak_t, strong_t = x_t if fixmatch else (x_t, None)
        return cmkd_loss(model, source_images=x_s.to(device), source_labels=y_s.to(device),
                         target_weak=weak_t.to(device), target_strong=None if strong_t is None else strong_t.to(device),
                         t=it.t, cfg=cfg)

    predict_args = dict(transform=student.preprocess, batch_size=job.eval_batch_size, device=device,
                        num_workers=workers)
    _, zero_shot = _predict(model, job.shard_dir("target"), **predict_args)  # before any update: the CLIP rows

    def predict() -> Prediction:
        keys, preds = _predict(model, job.shard_dir("target"), **predict_args)
        # h is distilled from the CLIP head g on the same (adapted) features: g is its teacher
        return Prediction(keys, preds["head"], {"clip_adapted": preds["clip"],
                                                "head_plus_clip": preds["head_plus_clip"]}, reference=preds["clip"])

    def state() -> dict:
        return {"head": _cpu(model.head.state_dict()), "visual": _cpu(model.visual.state_dict())}

    out = fit(steps=[Step("cmkd", step, optimizer, scheduler, per="iteration",
                          after=None if rst is None else lambda: rst(model.visual))],
              epochs=block["epochs"], batches=batches, predict=predict, state=state, train_mode=model.train,
              modules={"head": model.head, "visual": model.visual},
              resumable={"sources": sources, "targets": targets},  # streams that outlive an epoch
              **job.fit_settings("cmkd"))
    trained, head = _cpu(dict(model.visual.named_parameters())), _cpu(model.head.state_dict())
    base_cpu, dim = _cpu(base), model.text_vectors.shape[1]
    saved: dict = {"head": head}
    residual = None
    if rst is not None:  # only the sparse residual is kept; the dense tower is the base + residual
        saved["residual"] = residual_tensors(trained, base_cpu)
        residual = job.output.dir / "residual.safetensors" if job.output is not None else None
        if residual is not None:
            save_residual(residual, trained=trained, base=base_cpu, identity=student.identity)
    else:
        saved["visual"] = _cpu(model.visual.state_dict())
    dsp = dsp_counts(trained, base_cpu, head, n_classes=len(job.classes), dim=dim, path=residual)
    extra = {**out["extra"], "clip_zeroshot": zero_shot["clip"][None]}
    return MethodResult(keys=out["keys"], predictions=out["predictions"], log=out["log"], state=saved,
                        trainable_params=sum(p.numel() for p in model.trainable_parameters()),
                        class_vectors=model.text_vectors.cpu().numpy(), extra_predictions=extra,
                        extra_notes=EXTRA_NOTES, checkpoint={"rst": block["rst"], "template": block["template"]},
                        log_extra={"dsp": dsp, "residual_file": residual.name if residual else None})


class TaskHeadClassifier(nn.Module):
    """The shipped CMKD model: images -> h(f(x)), the task head on the adapted visual tower (fp32)."""

    def __init__(self, visual: nn.Module, head: TaskHead):
        super().__init__()
        self.visual, self.head = visual, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images.float()))


def classifier(state: dict[str, Any], config: dict[str, Any], base: LoadedModel) -> TaskHeadClassifier:
    """``Method.classifier``: writes the adapted tower INTO ``base`` (dense, or base + sparse residual with RST;
    a merged bundle's base already is the adapted tower), so ``base.model`` becomes the dense student."""
    visual = base.model.visual.float()
    if "visual" in state:
        visual.load_state_dict(state["visual"])
    elif "residual" in state:
        visual.load_state_dict(apply_residual(visual.state_dict(), state["residual"], where="the bundle"))
    W = state["class_vectors"]
    head = TaskHead(W.shape[1], W.shape[0])
    head.load_state_dict(state["head"])
    return TaskHeadClassifier(visual, head).eval()


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def parameter_counts(params: dict[str, Any], n_classes: int) -> list[dict[str, Any]]:
    name, block = params["model"]["student"]["name"], params["distill"]["cmkd"]
    clip = param_counts.meta_model(name)
    with torch.device("meta"):
        model = make_model(clip, param_counts.meta_tokenizer(name), param_counts.CLASS_NAMES * n_classes, block)
    visual = sum(p.numel() for p in model.visual.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    dim = model.text_vectors.shape[1]
    rows = [{"part": "visual tower (full fp32 fine-tune)", "model": name, "trainable": visual, "stored": visual},
            {"part": "task head (BN -> LN -> Linear)", "model": name, "trainable": head,
             "stored": sum(v.numel() for v in model.head.state_dict().values())}]
    if block["rst"]["enabled"]:
        rows[0] = {**rows[0], "part": f"visual tower, RST tau={block['rst']['threshold']:g} (stored: residual only)",
                   "stored": 0}
        rows.append({"part": f"RST budget: DSP = changed weights + {dim * n_classes:,} (paper) or "
                             f"+ {dim * n_classes + 4 * dim:,} (code); 8 bytes per changed weight",
                     "model": name, "trainable": 0, "stored": 0})
    return rows


METHOD = Method(name="cmkd", summary="fine-tune the student's visual tower with a task head distilled from its own "
                "CLIP head (CMKD; optional FixMatch and RST)", params=PARAMS, roles=("student",), run=run,
                parameter_counts=parameter_counts, classifier=classifier)
