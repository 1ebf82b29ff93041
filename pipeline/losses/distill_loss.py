"""The base class of every distillation loss chosen by name in params (a method's ``loss`` block).

A loss is one subclass of :class:`DistillLoss` in its own module, registered by name in
:data:`pipeline.losses.LOSSES`. It declares its ``name``, its own params block ``params`` (the fields of
``distill.<method>.loss.<name>``, each with a default; empty when it has none), the optional forward() inputs it reads
(``required_inputs``), and implements :meth:`DistillLoss.terms`. The base class owns what every loss shares: the
common keys (``weight``, ``reduction``, ``temperature``), shape and input checks, float32 with autocast off, the
total and the parts. Only a loss with parameters (``dual_head``) overrides ``inference_logits`` / ``init_head``.

The teacher logits, teacher features and class centres are constants (detached). The returned parts are the
weighted contributions, so they sum to the total.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.losses.kd import REDUCTIONS, kl_divergence
from pipeline.schema import Field, number, text


def common_fields(**defaults: Any) -> dict[str, Field]:
    """The keys every loss reads (``<method>.loss.<key>``); with ``defaults`` (a method's published setting)
    they may be left out, without them they are required (a KD weight means nothing without its reduction)."""
    d = {k: {"default": v} for k, v in defaults.items()}
    return {
        # KD weight w; read it together with `reduction` (w under numel == w/C under batchmean)
        "weight": number(0.0, **d.get("weight", {})),
        # batchmean: sum / B; numel: sum / (B*C), PromptKD's KD_WEIGHT 1000 / EKDA's 100 convention
        "reduction": text(REDUCTIONS, **d.get("reduction", {})),
        "temperature": number(0.0, exclusive_min=True, **d.get("temperature", {})),
    }


COMMON = tuple(common_fields())  # their names

INPUTS = ("f_s", "f_t", "class_centers")   # the optional forward() inputs a loss may read


class DistillLoss(nn.Module):
    """A distillation loss: ``forward(z_s, z_t, ...) -> (total, parts)`` and the prediction rule.

    Build one with :func:`pipeline.losses.build_distill_loss`, which validates ``cfg`` (a method's ``loss``
    block, every default filled in) and picks the subclass by name. A loss with parameters (``dual_head``'s
    ``head``) needs ``.parameters()`` in the optimiser, ``.to(device)`` and its ``state_dict()`` saved with the
    student; the others have none.
    """

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Field]] = {}          # the loss.<name> block: fields with defaults
    required_inputs: ClassVar[tuple[str, ...]] = ()  # which of INPUTS it reads; callers need compute only these

    def __init__(self, cfg: dict[str, Any], *, n_classes: int, feature_dim: int):
        super().__init__()
        for key, value in (("n_classes", n_classes), ("feature_dim", feature_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: {value!r}: expected an integer >= 1")
        self.cfg = cfg
        self.n_classes = n_classes
        self.feature_dim = feature_dim
        self.weight = float(cfg["weight"])
        self.reduction: str = cfg["reduction"]
        self.temperature = float(cfg["temperature"])
        self.head: nn.Linear | None = None

    def extra_repr(self) -> str:
        own = {f"{self.name}.{k}": v for k, v in self.cfg.get(self.name, {}).items()}
        return ", ".join(f"{k}={v!r}" for k, v in {**{k: self.cfg[k] for k in COMMON}, **own}.items())

    # -- what a loss implements ----------------------------------------------------------------------------
    def terms(self, z_s: torch.Tensor, z_t: torch.Tensor, *, f_s: torch.Tensor | None,
              f_t: torch.Tensor | None, class_centers: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """{part: weighted term} for float32 logits z_s, z_t [B,C] (z_t detached); the inputs named in
        ``required_inputs`` are present and of the right shape."""
        raise NotImplementedError

    def inference_logits(self, z_s: torch.Tensor, f_s: torch.Tensor | None = None) -> torch.Tensor:
        """What prediction uses; the student logits z_s unless the loss has a head of its own."""
        return z_s

    def init_head(self, class_centers: torch.Tensor, scale: float) -> None:
        """Initialise the loss's own head (``dual_head``); an error for a loss without one."""
        raise ValueError(f"init_head: the {self.name!r} loss has no head (it has no parameters)")

    # -- shared by the losses --------------------------------------------------------------------------------
    def kl_term(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """w * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) under ``reduction`` (:mod:`pipeline.losses.kd`)."""
        return self.weight * kl_divergence(z_s, z_t, temperature=self.temperature, reduction=self.reduction)

    def need(self, **inputs: torch.Tensor | None) -> None:
        for key, value in inputs.items():
            if value is None:
                raise ValueError(f"the {self.name!r} distillation loss needs {key} (it reads "
                                 f"{', '.join(self.required_inputs)}), but {key} is None")

    def check_features(self, key: str, f: torch.Tensor, batch: int) -> None:
        if f.dim() != 2 or f.shape[0] != batch or f.shape[1] != self.feature_dim:
            raise ValueError(f"the {self.name!r} distillation loss: {key} {tuple(f.shape)} must be "
                             f"[B, {self.feature_dim}] with B = {batch}, the logits' batch")

    # -- the API -----------------------------------------------------------------------------------------------
    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor, *, f_s: torch.Tensor | None = None,
                f_t: torch.Tensor | None = None,
                class_centers: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(total loss, {part: weighted value}) for student logits z_s [B,C] against teacher logits z_t [B,C]."""
        if z_s.dim() != 2 or z_s.shape != z_t.shape or z_s.shape[1] != self.n_classes:
            raise ValueError(f"the {self.name!r} distillation loss: student logits {tuple(z_s.shape)} and teacher "
                             f"logits {tuple(z_t.shape)} must both be [B, {self.n_classes}]")
        given = dict(zip(INPUTS, (f_s, f_t, class_centers)))
        self.need(**{key: given[key] for key in self.required_inputs})
        for key in ("f_s", "f_t"):
            if key in self.required_inputs:
                self.check_features(key, given[key], z_s.shape[0])
        if "class_centers" in self.required_inputs and \
                tuple(class_centers.shape) != (self.n_classes, self.feature_dim):
            raise ValueError(f"the {self.name!r} distillation loss: class_centers {tuple(class_centers.shape)} "
                             f"must be [{self.n_classes}, {self.feature_dim}]")
        with torch.autocast(device_type=z_s.device.type, enabled=False):
            parts = self.terms(z_s.float(), z_t.detach().float(), f_s=f_s, f_t=f_t, class_centers=class_centers)
            total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}
