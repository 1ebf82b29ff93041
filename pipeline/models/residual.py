"""Residual sparse training (RST) and the sparse residual file of a fine-tuned visual tower.

RST (CMKD, "Unsupervised Domain Adaption Harnessing Vision-Language Pre-training", TCSVT 2024; code
``Wenlve-Zhou/VLP-UDA``) projects the visual tower back to its pretrained values theta0 after every optimiser
step wherever it moved by at most tau, so only a sparse residual theta - theta0 survives training.

The residual is stored as ONE safetensors file (no pickle): per visual tensor that changed, ``<name>.index``
(int32 flat indices) and ``<name>.values`` (the new values, the tensor's dtype), 8 bytes per changed fp32
weight; restoring is a scatter into a copy of theta0, bit-exact. The metadata names the base model (identity
and a hash of its visual weights) and a residual refuses to be applied to any other base. The original keeps
torch COO tensors in a pickle and re-applies them by parameter position.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.io import atomic_write, follow_umask

FORMAT = "uda-distill/sparse-residual-v1"
RESIDUAL, EXTRA = "residual.", "extra."
IDENTITY_KEYS = ("name", "pretrained", "quick_gelu", "preprocess")  # as factory.assert_same_identity compares
_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
HEAD_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # stored in a head state, not trained


def frozen_copy(visual: torch.nn.Module, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """theta0: a detached copy of the visual tower's parameters (on the CPU by default, to spare the GPU)."""
    return {name: p.detach().to(device, copy=True) for name, p in visual.named_parameters()}


@torch.no_grad()
def project_(params: dict[str, torch.Tensor], base: dict[str, torch.Tensor], threshold: float) -> None:
    """In place: theta <- where(|theta - theta0| > threshold, theta, theta0) (strict >), per named parameter.

    Only the values change: the parameters stay the same objects, so optimiser momentum buffers are kept
    (the original does not reset them). ``base`` may live on another device; it is moved per tensor.
    """
    for name, p in params.items():
        theta0 = base[name].to(p.device, non_blocking=True)
        p.copy_(torch.where((p - theta0).abs() > threshold, p, theta0))


@dataclasses.dataclass
class RstProjection:
    """The RST step for ``cmkd_step``: call it with the visual tower after each optimiser step."""

    base: dict[str, torch.Tensor]
    threshold: float

    def __call__(self, visual: torch.nn.Module) -> None:
        project_(dict(visual.named_parameters()), self.base, self.threshold)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers, so comparisons see -0.0 vs 0.0 and NaN payloads (exact round trip)."""
    t = t.detach().contiguous()
    return t.view(_INT_OF[t.element_size()]) if t.is_floating_point() else t


def changed_mask(trained: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Where ``trained`` differs from ``base`` bit for bit (flat bool)."""
    if trained.shape != base.shape or trained.dtype != base.dtype:
        raise ValueError(f"trained {trained.dtype}{tuple(trained.shape)} and base {base.dtype}{tuple(base.shape)} "
                         f"differ in dtype or shape")
    return (_bits(trained.cpu()) != _bits(base.cpu())).reshape(-1)


def visual_weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of the base visual tensors."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_names(trained: dict, base: dict) -> None:
    if set(trained) != set(base):
        raise ValueError(f"trained and base visual states differ in tensor names: only in trained "
                         f"{sorted(set(trained) - set(base))[:5]}, only in base {sorted(set(base) - set(trained))[:5]}")


def _canonical(identity: dict) -> dict:
    return json.loads(json.dumps(identity, sort_keys=True))  # tuples -> lists, as they come back from the file


def residual_tensors(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """trained - base as ``{<name>.index: int32 flat indices, <name>.values: new values}`` per changed tensor."""
    _check_names(trained, base)
    tensors = {}
    for name in sorted(base):
        changed = changed_mask(trained[name], base[name])
        if base[name].numel() >= 2 ** 31:
            raise ValueError(f"{name}: {base[name].numel()} elements do not fit int32 indices")
        index = changed.nonzero().reshape(-1)
        if index.numel():
            tensors[f"{name}.index"] = index.to(torch.int32)
            tensors[f"{name}.values"] = trained[name].detach().cpu().reshape(-1)[index].contiguous()
    return tensors


def apply_residual(base: dict[str, torch.Tensor], residual: dict[str, torch.Tensor], *, where: str = "residual"
                   ) -> dict[str, torch.Tensor]:
    """A copy of ``base`` with the residual (:func:`residual_tensors`) scattered in: bit-exact."""
    restored = {name: t.detach().cpu().clone(memory_format=torch.contiguous_format) for name, t in base.items()}
    for key, index in residual.items():
        if not key.endswith(".index"):
            continue
        name = key[:-len(".index")]
        values = residual[f"{name}.values"]
        if name not in restored or values.dtype != restored[name].dtype:
            raise ValueError(f"{where}: residual tensor {name!r} ({values.dtype}) does not match the base")
        restored[name].view(-1)[index.long()] = values
    return restored


def save_residual(path: str | os.PathLike, *, trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                  identity: dict, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write :func:`residual_tensors` (prefixed ``residual.``) plus ``extra`` (dense) to one file, atomically.

    ``identity`` is the base model's (``LoadedModel.identity``); ``extra`` is typically the head's state dict.
    """
    tensors = {f"{RESIDUAL}{k}": t for k, t in residual_tensors(trained, base).items()}
    for name, t in (extra or {}).items():
        tensors[f"{EXTRA}{name}"] = t.detach().cpu().contiguous()
    metadata = {"format": FORMAT, "base_identity": json.dumps(_canonical(identity), sort_keys=True),
                "base_hash": visual_weights_hash(base)}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        follow_umask(tmp)

    return atomic_write(path, write)


def load_residual(path: str | os.PathLike, *, base: dict[str, torch.Tensor], identity: dict
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(restored visual state = base with the residual scattered in, extra tensors); refuses another base."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sparse residual file (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        stored_identity, stored_hash = json.loads(meta["base_identity"]), meta["base_hash"]
        found_identity, found_hash = _canonical(identity), visual_weights_hash(base)
        differ = [k for k in IDENTITY_KEYS if stored_identity.get(k) != found_identity.get(k)]
        if differ or stored_hash != found_hash:
            raise ValueError(
                f"{path} is a residual of another base model and cannot be applied: it was made for "
                f"{ {k: stored_identity.get(k) for k in IDENTITY_KEYS} } (visual weights sha256 {stored_hash[:16]}), "
                f"this base is { {k: found_identity.get(k) for k in IDENTITY_KEYS} } (sha256 {found_hash[:16]})"
                f"{'; differing: ' + ', '.join(differ) if differ else '; same identity, different weights'}")
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    residual = {key[len(RESIDUAL):]: t for key, t in tensors.items() if key.startswith(RESIDUAL)}
    extra = {key[len(EXTRA):]: t for key, t in tensors.items() if key.startswith(EXTRA)}
    return apply_residual(base, residual, where=str(path)), extra


def dsp_counts(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor], head_state: dict[str, torch.Tensor],
               *, n_classes: int, dim: int, path: str | os.PathLike | None = None) -> dict[str, int]:
    """Downstream parameters of one task, in both conventions (and the residual file's bytes when ``path``).

    ``changed`` = nnz(theta - theta0) over the visual tower (bitwise); ``dsp_code`` = changed + every head
    parameter (BN gamma, beta + LN gamma, beta + Linear = d*C + 4d; BN running statistics are not counted), as
    the original counts; ``dsp_paper`` = changed + d*C (the paper counts the head as one FC layer).
    """
    _check_names(trained, base)
    changed = sum(int(changed_mask(trained[n], base[n]).sum()) for n in base)
    head = sum(t.numel() for k, t in head_state.items() if k.rsplit(".", 1)[-1] not in HEAD_BUFFERS)
    if head != dim * n_classes + 4 * dim:
        raise ValueError(f"head state has {head} parameters, not d*C + 4d = {dim * n_classes + 4 * dim} for "
                         f"d={dim}, C={n_classes}: not a CMKD task head of this size")
    counts = {"changed": changed, "head": head, "dsp_code": changed + head, "dsp_paper": changed + dim * n_classes}
    if path is not None:
        counts["bytes"] = os.path.getsize(path)
    return counts
