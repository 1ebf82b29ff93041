"""Distillation losses, chosen by name in params."""
from pipeline.losses.kd import kl_divergence

__all__ = ["kl_divergence"]
