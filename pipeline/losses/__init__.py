"""Distillation losses, chosen by name in params (``distill.loss``); see :mod:`pipeline.losses.distill_loss`."""
from pipeline.losses.binary_kl import binary_kl
from pipeline.losses.distill_loss import (LOSS_DEFAULTS, LOSS_NAMES, REQUIRED_INPUTS, DistillLoss,
                                          build_distill_loss, validate_loss_config)
from pipeline.losses.kd import kl_divergence
from pipeline.losses.nd import nd_loss
from pipeline.losses.sinkhorn import sinkhorn_distance, sinkhorn_plan

__all__ = ["LOSS_DEFAULTS", "LOSS_NAMES", "REQUIRED_INPUTS", "DistillLoss", "binary_kl", "build_distill_loss",
           "kl_divergence", "nd_loss", "sinkhorn_distance", "sinkhorn_plan", "validate_loss_config"]
