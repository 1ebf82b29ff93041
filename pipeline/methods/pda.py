"""PDA: prompt-based distribution alignment, on a frozen CLIP (the teacher model; no student).

Bai et al., "Prompt-based Distribution Alignment for Unsupervised Domain Adaptation", AAAI 2024
(arXiv 2312.09553; ``BaiShuanghao/Prompt-based-Distribution-Alignment``, ``trainers/da/pda.py``,
``utils/ift_block.py``).

* Base branch: multimodal prompts (:class:`pipeline.models.teacher_prompts.PromptedTeacher`): a text context
  of ``n_ctx`` tokens (random-overwrite init) with deep text prompts in every layer, visual prompts after the
  class token whose layers 1..``coupled_depth`` are Linear(text width -> visual width) projections of the text
  prompts (MaPLe-style) and independent beyond. CE on the labelled source.
* Feature banks, built once before training from the frozen CLIP's zero-shot features and probabilities
  (prompt ``template``): K = ``bank_size`` slots per class, a source image enters only when its zero-shot
  prediction is its label, a target image by its pseudo-label; a slot is taken by a more confident image;
  construction walks the domain in batches (shard order here, the train loader there) and stops once every
  slot's confidence exceeds ``bank_stop``. Empty slots stay zero and count in the class mean, as there.
* Alignment branch (IFT): q, k, v from a 3-layer MLP (D -> D/8 -> D/8 -> 3D, BatchNorm + ReLU), the image
  feature attends (softmax of 0.1 q k^T) to the source and the target class means, F_sa = f + post(A_s v_s)
  (post: Linear D -> D), likewise F_ta; logits_c = beta s F_sa t^T + beta s F_ta t^T, beta = ``ift_scale``.
* Loss: source CE(logits, y) + CE(logits_c, y); target masked CE of both branches to pseudo-labels whose
  confidence >= ``threshold``: zero-shot CLIP's (on the batch, frozen encoder) while the 0-based epoch <=
  ``switch_epoch`` (the original's ``EPOCH``), then the base branch's own; no target loss while the 0-based
  epoch < ``warm_up``.
* Inference: logits + ``inference_weight`` (0.5) * logits_c; the base branch alone is scored as an extra.

Departures: the banks use the cached eval-view features (the original: its train view); the learning rate has
no 1-epoch 1e-5 warm-up (cosine from the first epoch, as every method here); fp32 unless model.teacher.precision
says otherwise. The original allocates one independent visual prompt more than it uses (6 for blocks 8..12);
it is kept, unused, so the trainable count equals the published one (3,179,136 on ViT-B/16). On Office-31 A->W
the original collapses after epoch 13 (PDA#5, #6): ``distill.collapse_fraction`` stops such a run.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.data.shards import image_loader
from pipeline.data.transforms import TRAIN_TRANSFORMS
from pipeline.features.cache import encode_shards, softmax_np, zero_shot_vectors
from pipeline.methods import param_counts
from pipeline.methods.base import Method, MethodResult, TaskJob
from pipeline.methods.classifiers import CosineClassifier
from pipeline.methods.shared import EndlessBatches, train_views
from pipeline.methods.training import Prediction, Step, fit, seeded, sgd_with_cosine
from pipeline.models.factory import LoadedModel, autocast
from pipeline.models.prompted import PROMPT_INITS, PromptedVisionEncoder, own_parameters, own_state
from pipeline.models.teacher_prompts import PromptedTeacher
from pipeline.schema import Block, integer, number, template, text

PARAMS = Block({  # the PDA repository's ViT-B/16 Office-Home settings; per-benchmark values in configs/
    "template": template(default="a photo of a {}."),  # context replaces its first words; zero-shot prompt too
    "n_ctx": integer(1, default=2),
    "init": text(PROMPT_INITS, default="random"),     # the original's N(0, 0.02) overwrite of the init words
    "depth": integer(0, default=0),                   # layers with their own prompts, both towers (0: every layer)
    "coupled_depth": integer(1, default=7),           # visual prompts of layers 1..this project the text prompts
    "bank_size": integer(1, default=5),               # K images per class and domain
    "bank_stop": number(0.0, maximum=1.0, default=0.99),  # stop building once every slot is this confident
    "threshold": number(0.0, maximum=1.0, default=0.8),   # pseudo-label confidence (Office-31 0.9, VisDA 0.6)
    "warm_up": integer(0, default=0),                 # epochs without the target loss (Office-31: 1)
    "switch_epoch": integer(0, default=10),           # 0-based epoch up to which pseudo-labels are zero-shot (Office-31: 0)
    "ift_scale": number(0.0, default=0.1),            # beta_s = beta_t
    "inference_weight": number(0.0, default=0.5),     # logits + this * logits_c
    "lr": number(0.0, exclusive_min=True, default=0.003),
    "epochs": integer(1, default=10),                 # an epoch is one pass over the source (Office-31: 20)
    "batch_size": integer(2, default=32),             # source and target batch each (BatchNorm: at least 2)
    "augment": text(TRAIN_TRANSFORMS, default="dassl"),
})
ATTENTION_SCALE = 0.1  # the IFT's softmax temperature (the original's self.scale)
EXTRA_NOTES = {"base_branch": "the base (prompt) branch alone, without the IFT logits"}


class Ift(nn.Module):
    """Image-feature transformer: attend from image features to the source and target class means."""

    def __init__(self, dim: int, beta: float):
        super().__init__()
        hidden = dim // 8
        self.pre = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 3 * dim))
        self.post = nn.Linear(dim, dim)
        self.beta = beta

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.pre(x)  # [N, 3D], interleaved as the original's rearrange 'b (d k) -> k b d'
        return out.unflatten(-1, (-1, 3)).unbind(-1)  # no len(x): torch.export keeps the batch dynamic

    def _aligned(self, feats: torch.Tensor, q: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        _, k, v = self._qkv(bank)
        attention = torch.softmax(ATTENTION_SCALE * q @ k.t(), dim=-1)
        return F.normalize(feats + self.post(attention @ v), dim=-1)

    def forward(self, text: torch.Tensor, feats: torch.Tensor, source_bank: torch.Tensor,
                target_bank: torch.Tensor, scale: float) -> torch.Tensor:
        """logits_c [B, C] of normalised ``feats`` [B, D] against class vectors ``text`` [C, D]."""
        q, _, _ = self._qkv(feats)
        aligned = self._aligned(feats, q, source_bank) + self._aligned(feats, q, target_bank)
        return self.beta * scale * aligned @ text.t()


class PdaModel(nn.Module):
    """The prompted CLIP, the IFT and the two class-mean banks (buffers, never trained)."""

    def __init__(self, clip: nn.Module, tokenizer, classnames: list[str], block: dict[str, Any]):
        super().__init__()
        self.clip = clip
        self.prompts = PromptedTeacher(
            clip, tokenizer, classnames, template=block["template"], n_ctx=block["n_ctx"], init=block["init"],
            text_depth=block["depth"], visual_location="middle", visual_depth=block["depth"],
            coupled_depth=block["coupled_depth"])
        dim = self.prompts.embed_dim
        self.ift = Ift(dim, block["ift_scale"])
        spare = self.prompts.visual_prompts  # the original's unused extra independent visual prompt
        self.unused_visual_prompt = nn.Parameter(torch.randn_like(spare[:1]) * 0.02) if spare is not None else None
        self.register_buffer("source_bank", torch.zeros(len(classnames), dim))
        self.register_buffer("target_bank", torch.zeros(len(classnames), dim))

    def logits(self, feats: torch.Tensor, text: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Base logits and IFT logits_c of normalised image features."""
        feats = feats.float()
        return scale * feats @ text.t(), self.ift(text, feats, self.source_bank, self.target_bank, scale)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return own_parameters(self, self.clip)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return own_state(self, self.clip)


def build_bank(features: np.ndarray, probs: np.ndarray, labels: np.ndarray | None, *, size: int, stop: float,
               batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class feature slots [C, K, D] and their confidences [C, K], filled as the original does.

    Walk ``features`` in order, ``batch_size`` rows at a time; a row whose arg-max class c (equal to its
    label when ``labels`` are given) is more confident than class c's least confident slot takes that slot;
    after each batch stop when every slot's confidence exceeds ``stop``.
    """
    n_classes = probs.shape[1]
    slots = np.zeros((n_classes, size, features.shape[1]), dtype=np.float32)
    confidence = np.zeros((n_classes, size), dtype=np.float32)
    predicted, best = probs.argmax(1), probs.max(1)
    for start in range(0, len(features), batch_size):
        for i in range(start, min(start + batch_size, len(features))):
            c = predicted[i]
            if labels is not None and labels[i] != c:
                continue
            slot = int(confidence[c].argmin())
            if best[i] > confidence[c, slot]:
                confidence[c, slot], slots[c, slot] = best[i], features[i]
        if confidence.min() > stop:
            break
    return slots, confidence


def pseudo_labels(zero_shot: torch.Tensor, own: torch.Tensor, *, epoch: int, switch_epoch: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, label) from the zero-shot probabilities while the 0-based ``epoch`` <= ``switch_epoch``,
    else from the model's own base logits' softmax."""
    probs = zero_shot if epoch <= switch_epoch else torch.softmax(own.detach().float(), dim=-1)
    return probs.max(1)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    return (F.cross_entropy(logits, labels, reduction="none") * mask).sum() / mask.sum()


def run(job: TaskJob) -> MethodResult:
    block, device, base = job.block, job.device, job.models["teacher"]
    clip, scale, precision = base.model.to(device), job.logit_scale, base.spec.precision
    with seeded(job.seed, deterministic=job.deterministic):
        model = PdaModel(clip, base.tokenizer, job.classnames, block).to(device)
    zs_text = torch.from_numpy(zero_shot_vectors(base, job.classnames, [block["template"]], device=device)).to(device)
    banks, fill = {}, {}
    for side, labels in (("source", job.source_labels(job.domain_keys("source"))), ("target", None)):
        feats = job.domain_features(side)
        probs = softmax_np(scale * feats @ zs_text.cpu().numpy().T)
        slots, confidence = build_bank(feats, probs, labels, size=block["bank_size"], stop=block["bank_stop"],
                                       batch_size=block["batch_size"])
        banks[side] = torch.from_numpy(slots.mean(1))
        fill[side] = {"filled": int((confidence > 0).sum()), "slots": int(confidence.size),
                      "min_confidence": round(float(confidence.min()), 4)}
    model.source_bank.copy_(banks["source"])
    model.target_bank.copy_(banks["target"])
    trainable = model.trainable_parameters()
    optimizer, scheduler = sgd_with_cosine(trainable, lr=block["lr"], momentum=job.distill["momentum"],
                                           weight_decay=job.distill["weight_decay"], epochs=block["epochs"])
    bs, views = block["batch_size"], train_views(base, block["augment"], job.device)
    targets = EndlessBatches(job.shard_dir("target"), batch_size=bs, seed=job.seed + 7919, with_labels=False,
                             num_workers=job.num_workers, min_size=2, **views)

    def batches(epoch: int):  # an epoch is one pass over the source; BatchNorm needs 2 rows
        for _, x_s, y_s in image_loader(job.shard_dir("source"), batch_size=bs, shuffle=True, seed=job.seed,
                                        epoch=epoch, with_labels=True, num_workers=job.num_workers, **views):
            if len(y_s) >= 2:
                yield x_s, y_s, next(targets)[1]

    def step(batch, it):
        x_s, y_s, x_t = (t.to(device) for t in batch)
        epoch = it.epoch - 1  # the original's 0-based epoch
        with autocast(precision, device):
            text = model.prompts.class_vectors().float()
            z_s, zc_s = model.logits(model.prompts.image_features(x_s), text, scale)
            z_t, zc_t = model.logits(model.prompts.image_features(x_t), text, scale)
            with torch.no_grad():
                zero_shot = torch.softmax(scale * F.normalize(clip.encode_image(x_t).float(), dim=-1) @ zs_text.t(), 1)
        source = F.cross_entropy(z_s, y_s) + F.cross_entropy(zc_s, y_s)
        confidence, y_t = pseudo_labels(zero_shot, z_t, epoch=epoch, switch_epoch=block["switch_epoch"])
        mask = confidence >= block["threshold"]
        target = (masked_ce(z_t, y_t, mask) + masked_ce(zc_t, y_t, mask) if mask.any() and epoch >= block["warm_up"]
                  else z_t.sum() * 0.0)
        loss = source + target
        return loss, {"loss": loss.item(), "source_ce": source.item(), "target_ce": target.item(),
                      "pseudo_labels_kept": mask.float().mean().item()}

    zs_target = softmax_np(scale * job.domain_features("target") @ zs_text.cpu().numpy().T).argmax(1)

    def predict() -> Prediction:
        keys, rules = _predict(job, model, scale)
        # the target loss's first teacher: zero-shot CLIP's pseudo-labels (before the confidence threshold)
        return Prediction(keys, rules["pda"], {"base_branch": rules["base_branch"]}, reference=zs_target)

    def train_mode() -> None:
        model.train()
        clip.eval()  # frozen CLIP: its dropout/norm layers stay in eval mode

    out = fit(epochs=block["epochs"], batches=batches, steps=[Step("pda", step, optimizer, scheduler)],
              predict=predict, state=lambda: {"model": model.trainable_state()}, train_mode=train_mode,
              modules={"model": model}, resumable={"targets": targets}, **job.fit_settings("pda"))
    model.eval()
    with torch.no_grad():
        text = model.prompts.class_vectors().float().cpu()
        visual_prompts = model.prompts.layer_visual_prompts().cpu()
    state = {"visual_prompts": visual_prompts, "ift": {k: v.detach().cpu().clone() for k, v in model.ift.state_dict().items()},
             "source_bank": model.source_bank.cpu(), "target_bank": model.target_bank.cpu()}
    return MethodResult(keys=out["keys"], predictions=out["predictions"], log=out["log"], state=state,
                        trainable_params=sum(p.numel() for p in trainable), class_vectors=text.numpy(),
                        extra_predictions=out["extra"], extra_notes=EXTRA_NOTES,
                        checkpoint={"inference_weight": block["inference_weight"], "ift_scale": block["ift_scale"]},
                        log_extra={"banks": fill})


@torch.no_grad()
def _predict(job: TaskJob, model: PdaModel, scale: float) -> tuple[list[str], dict[str, np.ndarray]]:
    model.eval()
    base = job.models["teacher"]
    keys, feats, _ = encode_shards(model.prompts.image_features, job.shard_dir("target"), transform=base.preprocess,
                                   batch_size=job.eval_batch_size, device=job.device, precision=base.spec.precision,
                                   num_workers=job.num_workers, desc="predict")
    text = model.prompts.class_vectors().float()
    z, zc = model.logits(feats.to(job.device), text, scale)
    return keys, {"pda": (z + job.block["inference_weight"] * zc).argmax(1).cpu().numpy(),
                  "base_branch": z.argmax(1).cpu().numpy()}


class PdaClassifier(nn.Module):
    """Images -> logits + w * logits_c, with the visual prompts and class vectors fixed after training."""

    def __init__(self, encoder: CosineClassifier, ift: Ift, source_bank: torch.Tensor, target_bank: torch.Tensor,
                 weight: float):
        super().__init__()
        self.base, self.ift, self.weight = encoder, ift, weight
        self.register_buffer("source_bank", source_bank.float().clone())
        self.register_buffer("target_bank", target_bank.float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(self.base.encoder(images).float(), dim=-1)
        text = self.base.class_vectors
        zc = self.ift(text, feats, self.source_bank, self.target_bank, self.base.logit_scale)
        return self.base.logit_scale * feats @ text.t() + self.weight * zc


def classifier(state: dict[str, Any], config: dict[str, Any], base: LoadedModel) -> PdaClassifier:
    """The shipped model on the frozen teacher CLIP (``Method.classifier``)."""
    prompts = state["visual_prompts"]
    encoder = PromptedVisionEncoder(base.model.visual, n_tokens=prompts.shape[1], depth=prompts.shape[0],
                                    location="middle")
    encoder.load_state_dict({"prompts": prompts}, strict=False)
    W = state["class_vectors"]
    ift = Ift(W.shape[1], config["method_config"]["ift_scale"])
    ift.load_state_dict(state["ift"])
    cosine = CosineClassifier(encoder, W, config["logit_scale"], precision=config["base"]["precision"])
    return PdaClassifier(cosine, ift, state["source_bank"], state["target_bank"],
                         config["method_config"]["inference_weight"]).eval()


def parameter_counts(params: dict[str, Any], n_classes: int) -> list[dict[str, Any]]:
    name, block = params["model"]["teacher"]["name"], params["distill"]["pda"]
    clip = param_counts.meta_model(name)
    block = {**block, "template": " ".join(["X"] * block["n_ctx"]) + " {}."}  # counts ignore the words
    with torch.device("meta"):
        model = PdaModel(clip, param_counts.meta_tokenizer(name), param_counts.CLASS_NAMES * n_classes, block)
    banks = model.source_bank.numel() + model.target_bank.numel()
    counts = param_counts.count(model, model.trainable_parameters(), clip)
    return [{"part": "multimodal prompts + projections + IFT (banks excluded)", "model": name,
             "trainable": counts["trainable"], "stored": counts["stored"] - banks}]


METHOD = Method(name="pda", summary="multimodal prompts with feature-bank alignment (IFT) on the teacher itself "
                "(PDA; no student)", params=PARAMS, roles=("teacher",), run=run, parameter_counts=parameter_counts,
                classifier=classifier, base_role="teacher")
