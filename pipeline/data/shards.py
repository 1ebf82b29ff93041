"""Image-folder domains as deterministic webdataset shards, and the loaders that read them.

Layout in: ``<image_dir>/<classname>/<file>`` (class-per-folder). Layout out (one folder per split)::

    <out_dir>/<split>-000000.tar ...   samples: <key>.cls, <key>.jpg (raw file bytes), <key>.json
    <out_dir>/sizes.json               {shard basename: n}, as open_clip reads it
    <out_dir>/manifest.json            classes (label order), counts, shards and keys in shard order

Labels always come from the caller's class list, never from a sort order. See
shared/reference/ecosystem.md §6 for the webdataset conventions followed here.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import re
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

import pipeline  # noqa: F401  (installs the torchvision guard before torch-related imports)
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.io import atomic_dir, atomic_write_json, read_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TAR_MTIME = 0  # fixed tar header fields so a re-run gives byte-identical shards (stable DVC hashes)
TAR_USER = TAR_GROUP = "uda"
SHUFFLE_BUFFER = 1000


# ----------------------------------------------------------------------------------------- listing


def _check_classes(classes: list[str]) -> list[str]:
    classes = list(classes)
    if not classes:
        raise ValueError("the class list is empty")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate class names in the class list: {dupes}")
    return classes


def sample_key(relative_path: str) -> str:
    """An opaque, stable key for an image: a hash of its path below the domain folder.

    Keys travel with every batch, also into the distill stage, which must not learn target labels: a key
    such as ``three/img_042`` would carry the class, so none is derived from the class or the file name.
    Hex digits only: periods would become webdataset extensions (faqs/0237).
    """
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:20]


def list_images(image_dir: Path, classes: list[str], *, allow_missing_classes: bool = False
                ) -> list[tuple[str, Path, int, str]]:
    """Return ``(key, path, label, classname)`` for every image, sorted by relative path.

    Hidden entries (``.DS_Store``, ``.ipynb_checkpoints``) and stray top-level files are ignored;
    non-image files inside a class folder are skipped.
    """
    image_dir = Path(image_dir)
    classes = _check_classes(classes)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    folders = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [f for f in folders if f not in classes]
    if unknown:
        raise ValueError(f"unknown class folder(s) {unknown} in {image_dir}; expected names: {classes}")
    missing = [c for c in classes if c not in folders]
    if missing and not allow_missing_classes:
        raise ValueError(f"class(es) {missing} have no folder in {image_dir} "
                         "(pass allow_missing_classes=True if that is expected)")

    label_of = {c: i for i, c in enumerate(classes)}
    items = []
    for classname in folders:
        for path in (image_dir / classname).iterdir():
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
                key = sample_key(path.relative_to(image_dir).as_posix())
                items.append((key, path, label_of[classname], classname))
    items.sort(key=lambda it: it[1].relative_to(image_dir).as_posix())

    seen: dict[str, Path] = {}
    for key, path, _, _ in items:
        if key in seen:
            raise ValueError(f"{seen[key]} and {path} map to the same sample key {key!r}")
        seen[key] = path
    return items


# ----------------------------------------------------------------------------------------- writing


def write_domain_shards(image_dir: Path, out_dir: Path, *, dataset: str, domain: str, classes: list[str],
                        maxcount: int, seed: int, split: str = "all",
                        allow_missing_classes: bool = False) -> dict:
    """Write ``image_dir`` as ``out_dir/<split>-%06d.tar`` shards plus sizes.json and manifest.json.

    The sample order is a seeded permutation of the sorted file list, so shards are byte-identical
    for the same inputs and seed, and no shard is one long run of a single class.
    Returns the manifest.
    """
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"split {split!r} must be letters, digits or '_' (it names the shard files)")
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    classes = _check_classes(classes)
    items = list_images(image_dir, classes, allow_missing_classes=allow_missing_classes)
    if not items:
        raise ValueError(f"no images found in {image_dir}")
    order = np.random.default_rng(seed).permutation(len(items))
    items = [items[i] for i in order]

    sizes: dict[str, int] = {}
    counts = {c: 0 for c in classes}
    start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        pattern = str(tmp).replace("%", "%%") + f"/{split}-%06d.tar"  # ShardWriter %-formats it
        writer = wds.ShardWriter(pattern, maxcount=maxcount, maxsize=float("inf"), verbose=0,
                                 encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_GROUP)
        try:
            for key, path, label, classname in tqdm(items, desc=f"shards {dataset}/{domain}/{split}",
                                                    unit="img", file=sys.stderr):
                meta = {"path": path.relative_to(image_dir).as_posix(), "dataset": dataset,
                        "domain": domain, "classname": classname}
                writer.write({"__key__": key,
                              "jpg": path.read_bytes(),  # raw bytes: no re-encode, whatever the format
                              "cls": str(label).encode("ascii"),
                              "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
                name = Path(writer.fname).name
                sizes[name] = sizes.get(name, 0) + 1
                counts[classname] += 1
        finally:
            writer.close()
        manifest = {"dataset": dataset, "domain": domain, "split": split, "classes": classes,
                    "counts": counts, "n": len(items), "shards": list(sizes), "keys": [it[0] for it in items],
                    "seed": seed, "maxcount": maxcount}
        atomic_write_json(tmp / "sizes.json", sizes)
        atomic_write_json(tmp / "manifest.json", manifest)
    elapsed = time.perf_counter() - start
    log.info("wrote %d images in %d shard(s) to %s in %.1f s (%.0f images/s)",
             len(items), len(sizes), out_dir, elapsed, len(items) / max(elapsed, 1e-9))
    return manifest


# ----------------------------------------------------------------------------------------- reading


def read_manifest(shard_dir: Path) -> dict:
    """The manifest.json of a shard folder."""
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in shard folder {Path(shard_dir)}; "
                                "run the shard stage first (it writes the shards and their manifest)")
    return read_json(path)


def read_labels(shard_dir: Path) -> tuple[list[str], np.ndarray]:
    """Keys and int labels in shard order, read from the ``.cls`` tar members (no image decoding)."""
    import tarfile

    shard_dir = Path(shard_dir)
    keys: list[str] = []
    labels: list[int] = []
    for shard in read_manifest(shard_dir)["shards"]:
        with tarfile.open(shard_dir / shard, "r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".cls"):
                    keys.append(member.name[: -len(".cls")])
                    labels.append(int(tar.extractfile(member).read()))
    return keys, np.asarray(labels, dtype=np.int64)


def _keep_member(fname: str, *, suffixes: tuple[str, ...]) -> bool:
    return fname.endswith(suffixes)


def _seeded_shuffle(src, *, seed: int, epoch: int, bufsize: int):
    # One rng per (seed, epoch, worker): reproducible, and workers do not mirror each other's order.
    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    rng = random.Random(int(np.random.SeedSequence([seed, epoch, worker]).generate_state(1)[0]))
    yield from wds.shuffle(bufsize, initial=bufsize, rng=rng)(src)


def _decode(sample: dict, *, transform: Callable, with_labels: bool) -> tuple:
    image = transform(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
    if with_labels:
        return sample["__key__"], image, int(sample["cls"])
    return sample["__key__"], image


def _collate(samples: list[tuple]) -> tuple:
    keys = [s[0] for s in samples]
    images = torch.stack([s[1] for s in samples])
    if len(samples[0]) == 3:
        return keys, images, torch.tensor([s[2] for s in samples], dtype=torch.long)
    return keys, images


class _Sized(torch.utils.data.IterableDataset):
    """A webdataset pipeline with a length (for progress bars); unlike ``with_length`` it pickles, so
    loader workers can start by spawn/forkserver."""

    def __init__(self, samples, length: int):
        self.samples, self.length = samples, length

    def __iter__(self):
        return iter(self.samples)

    def __len__(self) -> int:
        return self.length


def image_loader(shard_dir: Path, *, transform: Callable, batch_size: int, shuffle: bool, seed: int = 0,
                 epoch: int = 0, with_labels: bool, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """DataLoader yielding ``(keys, images)`` or, with labels, ``(keys, images, labels)`` batches.

    ``shuffle=True``: shard order and a ~1000-sample buffer are shuffled, before decoding, from
    (seed, epoch); build a new loader per epoch. ``shuffle=False``: shard order, then written order
    (exactly the manifest key order with ``num_workers <= 1``; workers interleave whole batches).
    Without labels the ``.cls`` members are never even read from the tars.
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    sizes = read_json(shard_dir / "sizes.json")
    shards = list(manifest["shards"])
    if shuffle:
        # Shard shuffle done here, before split_by_worker, so all workers agree on one permutation
        # and each worker gets different shards every epoch.
        shards = [shards[i] for i in np.random.default_rng([seed, epoch]).permutation(len(shards))]
    # A worker without a shard would only idle (and trip webdataset's empty check).
    num_workers = min(num_workers, len(shards))

    suffixes = (".jpg", ".cls") if with_labels else (".jpg",)
    dataset = wds.WebDataset([str(shard_dir / s) for s in shards], shardshuffle=False,
                             workersplitter=wds.split_by_worker, empty_check=False,
                             select_files=partial(_keep_member, suffixes=suffixes))
    if shuffle:
        dataset = dataset.compose(partial(_seeded_shuffle, seed=seed, epoch=epoch, bufsize=SHUFFLE_BUFFER))
    dataset = (dataset.map(partial(_decode, transform=transform, with_labels=with_labels))
               .batched(batch_size, collation_fn=_collate, partial=True))

    # Exact batch count: each worker reads shards[w::W] and keeps its own last partial batch.
    per_worker = [sum(sizes[s] for s in shards[w::max(num_workers, 1)]) for w in range(max(num_workers, 1))]
    dataset = _Sized(dataset, sum(math.ceil(n / batch_size) for n in per_worker))
    # Stages run their items in Prefect's worker threads; forking a process that has threads can leave
    # the child with a held lock, so workers start from a clean forkserver instead.
    context = "forkserver" if num_workers > 0 else None
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                                       persistent_workers=False, multiprocessing_context=context)


# ----------------------------------------------------------------------------------------- folders


class FolderDataset(torch.utils.data.Dataset):
    """``(key, image, label)`` over an image-folder tree; the baseline the shards are compared to."""

    def __init__(self, image_dir: Path, *, classes: list[str], transform: Callable,
                 allow_missing_classes: bool = False):
        self.items = list_images(Path(image_dir), classes, allow_missing_classes=allow_missing_classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, Any, int]:
        key, path, label, _ = self.items[index]
        with Image.open(path) as img:
            image = self.transform(img.convert("RGB"))
        return key, image, label


def folder_dataset(image_dir: Path, *, classes: list[str], transform: Callable,
                   allow_missing_classes: bool = False) -> FolderDataset:
    """A plain map-style Dataset over ``<image_dir>/<classname>/<file>``."""
    return FolderDataset(image_dir, classes=classes, transform=transform,
                         allow_missing_classes=allow_missing_classes)
