"""Distillation losses chosen by name in a distilling method's params (``distill.<method>.loss``), one module each.

:data:`LOSSES` maps each name to its class (a :class:`DistillLoss`); adding a loss is one module plus one entry
here. A ``loss`` block holds the keys every loss reads (``name``, ``weight``, ``reduction``, ``temperature``)
and, for a loss with settings of its own, a block named after it (``loss.sinkhorn.epsilon``); such a block may be
left out or given in part, its defaults come from the loss class. :func:`loss_schema` is that schema: a method
puts it in its params block with its published defaults (PromptKD: 1000 under numel, EKDA: 100), which
:mod:`pipeline.config` validates; :func:`build_distill_loss` validates the same way for direct use.

``kl``: w*T^2*KL(softmax(z_t/T) || softmax(z_s/T)), the PromptKD/EKDA logit loss.
``nd``: kl + nd.weight * L_ND (ECCV 2024 ND loss).
``sinkhorn``: kl + sinkhorn.weight * SinKD distance.
``dual_head``: DHO's CE head beside the KD head; prediction mixes them (dual_head.alpha, dual_head.beta).
``binary_kl``: w * DHKD's sigmoid KL *instead of* the softmax KL.
``binary_kl_norm``: w * DHKD's BinaryKL-Norm (the loss its training script uses) instead of the softmax KL.
``soft_ce``: w * SinKD's soft-target cross-entropy (no T^2, includes the teacher entropy) instead of the KL.
"""
from __future__ import annotations

import copy
from typing import Any

from pipeline.losses.binary_kl import BinaryKL, binary_kl
from pipeline.losses.binary_kl_norm import BinaryKLNorm, binary_kl_norm
from pipeline.losses.distill_loss import DistillLoss, common_fields
from pipeline.losses.dual_head import DualHead
from pipeline.losses.kd import kl_divergence
from pipeline.losses.kl import KL
from pipeline.losses.nd import ND, nd_loss
from pipeline.losses.sinkhorn import Sinkhorn, sinkhorn_distance, sinkhorn_plan
from pipeline.losses.soft_ce import SoftCE, soft_cross_entropy
from pipeline.schema import Block, ConfigError, text, validate

LOSSES: dict[str, type[DistillLoss]] = {
    "kl": KL,
    "nd": ND,
    "sinkhorn": Sinkhorn,
    "dual_head": DualHead,
    "binary_kl": BinaryKL,
    "binary_kl_norm": BinaryKLNorm,
    "soft_ce": SoftCE,
}


def loss_schema(**defaults: Any) -> dict[str, Any]:
    """The schema of a ``loss`` block: ``name``, the common keys, an optional block per loss that has settings.

    ``defaults`` (``name``, ``weight``, ``reduction``, ``temperature``) make those keys optional: wrap the result
    in a :class:`pipeline.schema.Block` to put it in a method's params block with the method's published setting.
    """
    name = {"default": defaults.pop("name")} if "name" in defaults else {}
    return {"name": text(tuple(LOSSES), **name), **common_fields(**defaults),
            **{n: Block(cls.params) for n, cls in LOSSES.items() if cls.params}}


# A complete default `loss` block (the `kl` loss, weight 1 batchmean, every block filled in with its defaults).
LOSS_DEFAULTS: dict[str, Any] = {
    "name": "kl", "weight": 1.0, "reduction": "batchmean", "temperature": 1.0,
    **{name: Block(cls.params).defaults() for name, cls in LOSSES.items() if cls.params},
}


def build_distill_loss(cfg: dict[str, Any], *, n_classes: int, feature_dim: int) -> DistillLoss:
    """The loss named by ``cfg["name"]``, built from a ``loss`` block.

    ``cfg`` is validated against :func:`loss_schema` (as :mod:`pipeline.config` does for a params file) and
    missing blocks take their defaults, in a copy; a problem is a :class:`ConfigError` naming the key.
    """
    cfg = copy.deepcopy(cfg)
    errors: list[str] = []
    validate(cfg, loss_schema(), "loss", errors)
    if errors:
        raise ConfigError("loss is invalid:\n  " + "\n  ".join(errors))
    return LOSSES[cfg["name"]](cfg, n_classes=n_classes, feature_dim=feature_dim)


__all__ = ["LOSSES", "LOSS_DEFAULTS", "DistillLoss", "binary_kl", "binary_kl_norm", "build_distill_loss",
           "kl_divergence", "loss_schema", "nd_loss", "sinkhorn_distance", "sinkhorn_plan",
           "soft_cross_entropy"]
