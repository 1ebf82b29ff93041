"""Text class vectors, teacher image features and a faiss index over them.

Image features are L2-normalised, so cosine similarity is the inner product and the index is ``IndexFlatIP``.
faiss runs on the GPU only when the installed build has GPU support and a GPU was assigned to the item.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.data.gpu_decode import check_decoder, gpu_image_batches
from pipeline.data.shards import image_loader, shard_keys
from pipeline.data.transforms import decode_size_of
from pipeline.io import atomic_write
from pipeline.models.factory import LoadedModel, autocast
from pipeline.models.teacher_prompts import PromptedTeacher
from pipeline.progress import progress

FAISS_INDEXES = ("flat_ip",)


@torch.no_grad()
def encode_shards(encode: Callable[[torch.Tensor], torch.Tensor], shard_dir: str | Path, *, transform,
                  batch_size: int, device: str, precision: str, with_labels: bool = False,
                  num_workers: int | str = 0, desc: str = "features", decode: str = "cpu",
                  preprocess: dict | None = None
                  ) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """Run ``encode`` (images -> features) over every image of ``shard_dir``.

    Returns keys, L2-normalised float features [N, D] on the CPU, and the labels when ``with_labels``
    (otherwise ``None``: the loader then never reads them), in manifest key order for any ``num_workers``
    (workers interleave batches; readers of the cache check its keys against the manifest's).
    Large JPEGs are decoded at a reduced scale down to the shorter side ``transform`` needs, when it says
    (:func:`pipeline.data.transforms.decode_size_of`; see ``image_loader``).

    ``decode="gpu"`` decodes and transforms the JPEGs on ``device`` (:mod:`pipeline.data.gpu_decode`)
    from the model's ``preprocess`` config instead of running ``transform`` in loader workers; no labels.
    """
    check_decoder(decode, device)
    keys: list[str] = []
    feats, labels = [], []
    if decode == "gpu":
        if with_labels or preprocess is None:
            raise ValueError("encode_shards: decode='gpu' needs the model's preprocess config and reads no labels")
        loader = gpu_image_batches(shard_dir, preprocess=preprocess, batch_size=batch_size, device=device)
    else:
        loader = image_loader(shard_dir, transform=transform, batch_size=batch_size, shuffle=False,
                              with_labels=with_labels, num_workers=num_workers,
                              decode_size=decode_size_of(transform),
                              device=device)
    for batch in progress(loader, desc=desc, unit="batch", leave=False):
        with autocast(precision, device):
            # non_blocking: the next batch is read while this copy runs (a no-op on the CPU or when on device)
            out = encode(batch[1].to(device, non_blocking=True))
        feats.append(F.normalize(out.float(), dim=-1).cpu())
        keys.extend(batch[0])
        if with_labels:
            labels.append(batch[2])
    # The loader checked every shard against the manifest, so this is a permutation.
    expected = shard_keys(shard_dir)
    feats = torch.cat(feats)
    labels = torch.cat(labels) if with_labels else None
    if keys == expected:  # one reader (no workers, or GPU decode): already in order, no second copy of N x D
        return expected, feats, labels
    position = {key: i for i, key in enumerate(keys)}
    order = torch.tensor([position[key] for key in expected], dtype=torch.long)
    return expected, feats[order], (labels[order] if with_labels else None)


def encode_images(model: LoadedModel, shard_dir: str | Path, *, batch_size: int, device: str,
                  num_workers: int | str = 0, desc: str = "features", decode: str = "cpu"
                  ) -> tuple[list[str], np.ndarray]:
    """Keys (shard order) and L2-normalised image features [N, D] of every image; no labels are read.
    ``decode="gpu"`` decodes the JPEGs on ``device`` (:mod:`pipeline.data.gpu_decode`)."""
    model.model.to(device)
    keys, feats, _ = encode_shards(model.model.encode_image, shard_dir, transform=model.preprocess,
                                   batch_size=batch_size, device=device, precision=model.spec.precision,
                                   num_workers=num_workers, desc=desc, decode=decode,
                                   preprocess=model.identity["preprocess"])
    return keys, feats.numpy().astype(np.float32)


@torch.no_grad()
def zero_shot_vectors(model: LoadedModel, classnames: list[str], templates: list[str], *,
                      device: str) -> np.ndarray:
    """Template-ensemble class vectors [C, D]: mean of normalised prompt embeddings, re-normalised."""
    model.model.to(device)
    vectors = []
    for name in classnames:
        tokens = model.tokenizer([t.format(name) for t in templates]).to(device)
        with autocast(model.spec.precision, device):
            emb = F.normalize(model.model.encode_text(tokens).float(), dim=-1)
        vectors.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(vectors).cpu().numpy().astype(np.float32)


@torch.no_grad()
def prompted_vectors(teacher: PromptedTeacher, states: list[dict[str, torch.Tensor]], *, precision: str,
                     device: str) -> np.ndarray:
    """Class vectors [E, C, D] of a prompted teacher, one set per saved trainable state (epoch)."""
    out = []
    for state in states:
        teacher.load_trainable_state(state)
        with autocast(precision, device):
            out.append(teacher.class_vectors().float().cpu())
    return torch.stack(out).numpy().astype(np.float32)


@torch.no_grad()
def conditional_logits(teacher: PromptedTeacher, features: np.ndarray, logit_scale: float, *, precision: str,
                       device: str, batch_size: int) -> np.ndarray:
    """Logits [N, C] of a teacher whose class vectors depend on the image (CoCoOp), ``batch_size`` images
    (times C prompts) per text-tower pass."""
    out = []
    for chunk in torch.split(torch.from_numpy(features), batch_size):
        with autocast(precision, device):
            out.append(teacher.logits(chunk.to(device), logit_scale).float().cpu())
    return torch.cat(out).numpy().astype(np.float32)


@torch.no_grad()
def mean_conditioned_vectors(teacher: PromptedTeacher, features: np.ndarray, *, device: str) -> np.ndarray:
    """One fixed [C, D] classifier from a CoCoOp teacher, for a student that needs class vectors: its
    class vectors conditioned on the normalised mean of ``features`` (the domain's mean image)."""
    mean = F.normalize(torch.from_numpy(features).float().mean(0, keepdim=True), dim=-1).to(device)
    return teacher.class_vectors(mean)[0].float().cpu().numpy().astype(np.float32)


def logits(features: np.ndarray, class_vectors: np.ndarray, logit_scale: float) -> np.ndarray:
    """CLIP logits s * f @ W^T (both sides L2-normalised)."""
    return (logit_scale * features @ class_vectors.T).astype(np.float32)


def softmax_np(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a numpy array (stable)."""
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _faiss():
    import faiss  # imported lazily: faiss-cpu or faiss-gpu, whichever extra is installed

    return faiss


def faiss_uses_gpu(device: str) -> bool:
    faiss = _faiss()
    return (device.startswith("cuda") and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus() > 0)


def build_index(features: np.ndarray, *, index_type: str = "flat_ip", device: str = "cpu") -> tuple[Any, dict]:
    """A faiss inner-product index over ``features``, on the assigned GPU when possible; and its metadata."""
    if index_type != "flat_ip":
        raise ValueError(f"features.faiss_index {index_type!r} is not supported; use 'flat_ip'")
    faiss = _faiss()
    index = faiss.IndexFlatIP(features.shape[1])
    on_gpu = faiss_uses_gpu(device)
    if on_gpu:
        gpu_id = int(device.split(":")[1]) if ":" in device else 0
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu_id, index)
    index.add(np.ascontiguousarray(features, dtype=np.float32))
    meta = {"index_type": "IndexFlatIP", "metric": "inner_product (cosine on L2-normalised features)",
            "dim": int(features.shape[1]), "ntotal": int(index.ntotal), "built_on": "gpu" if on_gpu else "cpu",
            "faiss_version": faiss.__version__}
    return index, meta


def save_index(index: Any, path: str | Path) -> Path:
    """Write the index (moved to CPU first) via a temporary name and an atomic rename."""
    faiss = _faiss()
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    return atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))


def load_index(path: str | Path) -> Any:
    return _faiss().read_index(str(path))
