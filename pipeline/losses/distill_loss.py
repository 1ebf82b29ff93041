"""Distillation losses chosen by name (params block ``distill.loss``), one module for every distilling method.

``kl``: w*T^2*KL(softmax(z_t/T) || softmax(z_s/T)), the PromptKD/EKDA logit loss (:mod:`pipeline.losses.kd`).
``nd``: kl + nd_weight * L_ND (ECCV 2024 ND loss, :mod:`pipeline.losses.nd`).
``sinkhorn``: kl + sinkhorn_weight * SinKD distance (:mod:`pipeline.losses.sinkhorn`).
``binary_kl``: w * DHKD's sigmoid KL *instead of* the softmax KL (:mod:`pipeline.losses.binary_kl`).
``dual_head``: DHO (Kang et al. 2025, ``erjui/DHO``) adapted to UDA: the student's own logits z_s play DHO's KD
head; this module owns DHO's CE head, a linear layer on the L2-normalised student feature. Without target labels the
CE head learns the teacher's pseudo-labels argmax z_t (DHO: ground-truth labels of the labelled split). Loss =
1/2 CE(head) + 1/2 kl term on z_s; prediction = log[(1-alpha) softmax(head) + alpha softmax(z_s/beta)].

The teacher logits, teacher features and class centres are constants (detached). The returned parts are the weighted
contributions, so they sum to the total. Everything runs in float32 with autocast off.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.losses.binary_kl import binary_kl
from pipeline.losses.kd import kl_divergence
from pipeline.losses.nd import nd_loss
from pipeline.losses.sinkhorn import sinkhorn_distance

LOSS_NAMES = ("kl", "nd", "sinkhorn", "dual_head", "binary_kl")
REDUCTIONS = ("batchmean", "numel")

LOSS_DEFAULTS: dict[str, object] = {
    "name": "kl",
    "weight": 1.0,              # KD weight w; read it together with `reduction` (w under numel == w/C under batchmean)
    "reduction": "batchmean",   # batchmean: sum / B; numel: sum / (B*C), PromptKD's KD_WEIGHT 1000 convention
    "temperature": 1.0,
    "nd_weight": 1.0,           # lambda_ND, the ND paper's CIFAR value
    # SinKD's code weights its loss by 0.0008*20/8 = 0.002 (times --beta 0.8 in its GLUE scripts), but that multiplies
    # a loss summed over a plan of mass B (ours is divided by B, see sinkhorn.py) at batch 16, next to a soft-label
    # cross-entropy with weight 0.8-0.9 at T = 3-3.5 *without* the T^2 factor. In our units that is about
    # 0.8*0.002*16 = 0.026 against w = 0.8/3^2 = 0.09, i.e. sinkhorn_weight ~ 0.3*w (w in batchmean units), so the
    # literal 0.002 cannot be copied. 1.0 is the neutral unit weight: the term is a per-sample mean L1 transport cost
    # in [0, 2], the same order as T^2*KL_bm, so with w = 1 the two start comparable. Not tuned; sweep it.
    "sinkhorn_weight": 1.0,
    "sinkhorn_epsilon": 0.1,    # SinKD
    "sinkhorn_iters": 20,       # SinKD: 20 rounds of row-then-column normalisation
    "dual_alpha": 0.5,          # DHO inference mix: 0 = CE head only, 1 = z_s only (DHO grid-searches both)
    "dual_beta": 1.0,           # DHO inference temperature on z_s
}

# Which optional forward() inputs each loss reads; the integrator needs to compute only these.
REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "kl": (), "nd": ("f_s", "f_t", "class_centers"), "sinkhorn": (), "dual_head": ("f_s",), "binary_kl": (),
}


def _number(key: str, value, *, minimum: float | None = None, maximum: float | None = None,
            exclusive_min: bool = False) -> float:
    """``value`` as a finite float within bounds, else a ValueError naming ``distill.loss.<key>``."""
    bound = ""
    if minimum is not None:
        bound += f" {'>' if exclusive_min else '>='} {minimum}"
    if maximum is not None:
        bound += f"{' and' if bound else ''} <= {maximum}"
    expected = f"expected a finite number{bound}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"distill.loss.{key}: {value!r}: {expected}")
    if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
        raise ValueError(f"distill.loss.{key}: {value!r}: {expected}")
    if maximum is not None and value > maximum:
        raise ValueError(f"distill.loss.{key}: {value!r}: {expected}")
    return float(value)


def validate_loss_config(cfg: dict) -> dict:
    """Check every key of a ``distill.loss`` block; return it with numbers as floats (iters as int).

    Every key of :data:`LOSS_DEFAULTS` is required and no other key is allowed, so a typo cannot fall back to a
    default. Errors are ValueErrors naming the key (``distill.loss.<key>``), the value and what was expected.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"distill.loss: expected a mapping with keys {list(LOSS_DEFAULTS)}, got {type(cfg).__name__}")
    for key in cfg:
        if key not in LOSS_DEFAULTS:
            raise ValueError(f"distill.loss.{key}: unknown key; expected only {list(LOSS_DEFAULTS)}")
    for key in LOSS_DEFAULTS:
        if key not in cfg:
            raise ValueError(f"distill.loss.{key}: missing (default {LOSS_DEFAULTS[key]!r})")
    if cfg["name"] not in LOSS_NAMES:
        raise ValueError(f"distill.loss.name: {cfg['name']!r}: expected one of {list(LOSS_NAMES)}")
    if cfg["reduction"] not in REDUCTIONS:
        raise ValueError(f"distill.loss.reduction: {cfg['reduction']!r}: expected one of {list(REDUCTIONS)}")
    iters = cfg["sinkhorn_iters"]
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"distill.loss.sinkhorn_iters: {iters!r}: expected an integer >= 1")
    return {
        "name": cfg["name"],
        "weight": _number("weight", cfg["weight"], minimum=0.0),
        "reduction": cfg["reduction"],
        "temperature": _number("temperature", cfg["temperature"], minimum=0.0, exclusive_min=True),
        "nd_weight": _number("nd_weight", cfg["nd_weight"], minimum=0.0),
        "sinkhorn_weight": _number("sinkhorn_weight", cfg["sinkhorn_weight"], minimum=0.0),
        "sinkhorn_epsilon": _number("sinkhorn_epsilon", cfg["sinkhorn_epsilon"], minimum=0.0, exclusive_min=True),
        "sinkhorn_iters": iters,
        "dual_alpha": _number("dual_alpha", cfg["dual_alpha"], minimum=0.0, maximum=1.0),
        "dual_beta": _number("dual_beta", cfg["dual_beta"], minimum=0.0, exclusive_min=True),
    }


class DistillLoss(nn.Module):
    """The ``distill.loss`` chosen by name. Build it with :func:`build_distill_loss`.

    Only ``dual_head`` has parameters (``head``, a Linear(feature_dim, n_classes)); add ``.parameters()`` to the
    optimiser, move the module with ``.to(device)`` and save its ``state_dict()`` with the student.
    """

    def __init__(self, cfg: dict, *, n_classes: int, feature_dim: int):
        super().__init__()
        cfg = validate_loss_config(cfg)
        for key, value in (("n_classes", n_classes), ("feature_dim", feature_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: {value!r}: expected an integer >= 1")
        self.cfg = cfg
        self.name: str = cfg["name"]
        self.n_classes = n_classes
        self.feature_dim = feature_dim
        self.required_inputs: tuple[str, ...] = REQUIRED_INPUTS[self.name]
        self.head: nn.Linear | None = None
        if self.name == "dual_head":
            self.head = nn.Linear(feature_dim, n_classes)
            with torch.no_grad():                      # near-uniform start; prefer init_head(class_centers, scale)
                nn.init.normal_(self.head.weight, std=0.01)
                nn.init.zeros_(self.head.bias)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.cfg.items())

    # -- dual_head ---------------------------------------------------------------------------------------------
    def init_head(self, class_centers: torch.Tensor, scale: float) -> None:
        """dual_head only: weight = scale * normalised class_centers [C,D], bias = 0 (zero-shot CLIP as a start)."""
        if self.head is None:
            raise ValueError(f"init_head: the {self.name!r} loss has no head (only 'dual_head' does)")
        if tuple(class_centers.shape) != (self.n_classes, self.feature_dim):
            raise ValueError(f"init_head: class_centers {tuple(class_centers.shape)} must be "
                             f"[{self.n_classes}, {self.feature_dim}]")
        with torch.no_grad():
            self.head.weight.copy_(float(scale) * F.normalize(class_centers.detach().float(), dim=-1))
            self.head.bias.zero_()

    def head_logits(self, f_s: torch.Tensor) -> torch.Tensor:
        """dual_head only: the CE head's logits on the L2-normalised student features."""
        if self.head is None:
            raise ValueError(f"head_logits: the {self.name!r} loss has no head (only 'dual_head' does)")
        self._check_features("f_s", f_s)
        return self.head(F.normalize(f_s.float(), dim=-1))

    # -- helpers -----------------------------------------------------------------------------------------------
    def _need(self, **inputs) -> None:
        for key, value in inputs.items():
            if value is None:
                raise ValueError(f"the {self.name!r} distillation loss needs {key} (it reads "
                                 f"{', '.join(self.required_inputs)}), but {key} is None")

    def _check_features(self, key: str, f: torch.Tensor) -> None:
        if f.dim() != 2 or f.shape[1] != self.feature_dim:
            raise ValueError(f"the {self.name!r} distillation loss: {key} {tuple(f.shape)} must be "
                             f"[B, {self.feature_dim}]")

    def _kl_term(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return cfg["weight"] * kl_divergence(z_s, z_t, temperature=cfg["temperature"], reduction=cfg["reduction"])

    # -- the API -----------------------------------------------------------------------------------------------
    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor, *, f_s: torch.Tensor | None = None,
                f_t: torch.Tensor | None = None,
                class_centers: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(total loss, {part: weighted value}) for student logits z_s [B,C] against teacher logits z_t [B,C]."""
        if z_s.dim() != 2 or z_s.shape != z_t.shape or z_s.shape[1] != self.n_classes:
            raise ValueError(f"the {self.name!r} distillation loss: student logits {tuple(z_s.shape)} and teacher "
                             f"logits {tuple(z_t.shape)} must both be [B, {self.n_classes}]")
        cfg = self.cfg
        with torch.autocast(device_type=z_s.device.type, enabled=False):
            z_s = z_s.float()
            z_t = z_t.detach().float()
            parts: dict[str, torch.Tensor] = {}
            if self.name == "kl":
                parts["kl"] = self._kl_term(z_s, z_t)
            elif self.name == "nd":
                self._need(f_s=f_s, f_t=f_t, class_centers=class_centers)
                self._check_features("f_s", f_s)
                if tuple(class_centers.shape) != (self.n_classes, self.feature_dim):
                    raise ValueError(f"the 'nd' distillation loss: class_centers {tuple(class_centers.shape)} "
                                     f"must be [{self.n_classes}, {self.feature_dim}]")
                parts["kl"] = self._kl_term(z_s, z_t)
                parts["nd"] = cfg["nd_weight"] * nd_loss(f_s, f_t, class_centers, z_t.argmax(dim=1))
            elif self.name == "sinkhorn":
                parts["kl"] = self._kl_term(z_s, z_t)
                parts["sinkhorn"] = cfg["sinkhorn_weight"] * sinkhorn_distance(
                    z_s, z_t, temperature=cfg["temperature"], epsilon=cfg["sinkhorn_epsilon"],
                    n_iters=cfg["sinkhorn_iters"])
            elif self.name == "binary_kl":
                parts["binary_kl"] = cfg["weight"] * binary_kl(z_s, z_t, temperature=cfg["temperature"],
                                                               reduction=cfg["reduction"])
            else:  # dual_head
                self._need(f_s=f_s)
                parts["ce"] = 0.5 * F.cross_entropy(self.head_logits(f_s), z_t.argmax(dim=1))
                parts["kl"] = 0.5 * self._kl_term(z_s, z_t)
            total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def inference_logits(self, z_s: torch.Tensor, f_s: torch.Tensor | None = None) -> torch.Tensor:
        """What prediction uses: z_s, except dual_head: log[(1-alpha) softmax(head(f_s)) + alpha softmax(z_s/beta)]."""
        if self.head is None:
            return z_s
        self._need(f_s=f_s)
        alpha, beta = self.cfg["dual_alpha"], self.cfg["dual_beta"]
        with torch.autocast(device_type=z_s.device.type, enabled=False):
            log_head = F.log_softmax(self.head_logits(f_s), dim=-1)
            log_kd = F.log_softmax(z_s.float() / beta, dim=-1)
            if alpha == 0.0:
                return log_head
            if alpha == 1.0:
                return log_kd
            return torch.logaddexp(math.log(1.0 - alpha) + log_head, math.log(alpha) + log_kd)


def build_distill_loss(cfg: dict, *, n_classes: int, feature_dim: int) -> DistillLoss:
    """The :class:`DistillLoss` named by ``cfg["name"]``; ValueError naming the key for an unknown name/bad value."""
    return DistillLoss(cfg, n_classes=n_classes, feature_dim=feature_dim)
