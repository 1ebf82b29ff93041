"""Webdataset shards of one domain: the loaders that read them, and the image-folder writer.

Layout (one folder per domain; written by :mod:`pipeline.data.sharding`)::

    <out_dir>/<split>-000000.tar ...   samples: <key>.cls, <key>.jpg (raw or down-sized bytes), <key>.json
    <out_dir>/sizes.json               {shard basename: n}, as open_clip reads it
    <out_dir>/manifest.json            classes (label order), counts, shards and keys in shard order,
                                       skipped files with the reason, per shard its count and sha256

Every reader checks what it reads against the manifest while it reads (:func:`checked_keys`): each shard
must hold exactly the manifest's keys of that shard, in order. A truncated shard, an appended sample or a
replaced key stops the run with a :class:`ShardIntegrityError` instead of quietly training or scoring on
other data. The tars are read by :mod:`pipeline.data.tar_reader` (webdataset's pipeline stages do the
rest: worker split, shuffle, decode, batching).

Labels always come from the caller's class list, never from a sort order. See
the webdataset FAQ (``webdataset/webdataset``, shuffle before decode, explicit ``shardshuffle``, worker
splitting) for the conventions followed here.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import multiprocessing
import os
import random
from functools import partial
from pathlib import Path
from operator import itemgetter
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

import pipeline  # noqa: F401  (installs the torchvision guard before torch-related imports)
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.folders import list_class_tree
from pipeline.data.sharding import sample_key, write_shards
from pipeline.data.seeding import seeded_call, view_seed
from pipeline.data.tar_reader import TarFormatError, tar_samples
from pipeline.io import read_json

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 1000
REPAIR = "restore the shards with `dvc checkout {dir}` or re-write them with `dvc repro -f -s shard`"
T = TypeVar("T")


class ShardIntegrityError(ValueError):
    """A shard folder does not hold what its manifest says (a cut or edited tar, an old manifest)."""


# ----------------------------------------------------------------------------------------- writing


def list_images(image_dir: Path, classes: list[str], *, allow_missing_classes: bool = False
                ) -> list[tuple[str, Path, int, str]]:
    """Return ``(key, path, label, classname)`` for every image of a class-per-folder tree, sorted by
    relative path (see :func:`pipeline.data.folders.list_class_tree` for the matching rules)."""
    samples, _ = list_class_tree(image_dir, classes, allow_missing_classes=allow_missing_classes)
    return [(sample_key(s.relpath), Path(s.path), s.label, s.classname) for s in samples]


def write_domain_shards(image_dir: Path, out_dir: Path, *, dataset: str, domain: str, classes: list[str],
                        maxcount: int, seed: int, split: str = "all", allow_missing_classes: bool = False,
                        workers: int = 1, max_bad_fraction: float = 0.0, store_max_side: int | None = None) -> dict:
    """Write the class-per-folder tree ``image_dir`` as ``out_dir/<split>-%06d.tar`` shards plus sizes.json
    and manifest.json (:func:`pipeline.data.sharding.write_shards`). Returns the manifest."""
    samples, skipped = list_class_tree(image_dir, classes, allow_missing_classes=allow_missing_classes)
    return write_shards(samples, out_dir, dataset=dataset, domain=domain, classes=classes, maxcount=maxcount,
                        seed=seed, split=split, workers=workers, max_bad_fraction=max_bad_fraction,
                        skipped=skipped, source={"folder": str(image_dir)}, store_max_side=store_max_side)


# ----------------------------------------------------------------------------------------- reading


def read_manifest(shard_dir: Path) -> dict:
    """The manifest.json of a shard folder."""
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in shard folder {Path(shard_dir)}; "
                                "run the shard stage first (it writes the shards and their manifest)")
    return read_json(path)


def shard_keys(shard_dir: Path) -> list[str]:
    """Every sample key of a shard folder, in shard order: the row order cached features must have."""
    return list(read_manifest(shard_dir)["keys"])


def shard_plan(shard_dir: Path) -> dict[str, list[str]]:
    """``{shard file name: its sample keys in written order}`` from the manifest, in shard order.

    A manifest from before per-shard counts were recorded cannot be checked, so it is refused.
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    files = manifest.get("shard_files")
    if files is None:
        raise ShardIntegrityError(f"{shard_dir / 'manifest.json'} has no per-shard counts and hashes (written "
                                  "by an older version); re-write the shards with `dvc repro -f -s shard`")
    keys, plan, start = manifest["keys"], {}, 0
    for name in manifest["shards"]:
        plan[name] = keys[start:start + files[name]["n"]]
        start += files[name]["n"]
    if start != len(keys):
        raise ShardIntegrityError(f"{shard_dir / 'manifest.json'}: its shards hold {start} samples but it lists "
                                  f"{len(keys)} keys; {REPAIR.format(dir=shard_dir)}")
    return plan


def checked_keys(items: Iterable[T], *, shard: Path, expected: list[str], key: Callable[[T], str]
                 ) -> Iterator[T]:
    """Pass ``items`` (samples of one shard, in read order) through, checking that their keys are
    ``expected`` in order; the count is checked when the shard ends. No extra read: it wraps the reader.

    Raises :class:`ShardIntegrityError` naming the shard, at the first unexpected key or at the end.
    """
    shard, n = Path(shard), 0
    for item in items:
        found = key(item)
        if n >= len(expected) or found != expected[n]:
            what = f"expected {expected[n]!r}" if n < len(expected) else f"the manifest lists only {len(expected)}"
            raise ShardIntegrityError(f"shard {shard} does not match its manifest: sample {n + 1} has key "
                                      f"{found!r}, {what}; {REPAIR.format(dir=shard.parent)}")
        n += 1
        yield item
    if n != len(expected):
        raise ShardIntegrityError(f"shard {shard} does not match its manifest: found {n} samples, expected "
                                  f"{len(expected)} (truncated?); {REPAIR.format(dir=shard.parent)}")


@contextlib.contextmanager
def readable_shard(path: Path):
    """Report a shard that is not a plain ustar archive (:class:`TarFormatError`) as a damaged shard."""
    try:
        yield
    except TarFormatError as exc:
        raise ShardIntegrityError(f"{exc}; {REPAIR.format(dir=Path(path).parent)}") from None


def read_labels(shard_dir: Path) -> tuple[list[str], np.ndarray]:
    """Keys and int labels in shard order, read from the ``.cls`` tar members (no image decoding) and
    checked against the manifest (:func:`checked_keys`)."""
    shard_dir = Path(shard_dir)
    keys: list[str] = []
    labels: list[int] = []
    for shard, expected in shard_plan(shard_dir).items():
        with readable_shard(shard_dir / shard):
            for sample in checked_keys(tar_samples(shard_dir / shard, (".cls",)), shard=shard_dir / shard,
                                       expected=expected, key=itemgetter("__key__")):
                keys.append(sample["__key__"])
                labels.append(int(sample["cls"]))
    return keys, np.asarray(labels, dtype=np.int64)


def _checked_samples(shards, *, plan: dict[str, list[str]], suffixes: tuple[str, ...]):
    # One shard at a time, after the worker split and before shuffling, so every worker checks whole
    # shards (also one it reads nothing from) in their written order.
    for shard in shards:
        path = Path(shard["url"])
        with readable_shard(path):
            yield from checked_keys(tar_samples(path, suffixes), shard=path, expected=plan[path.name],
                                    key=itemgetter("__key__"))


def _seeded_shuffle(src, *, seed: int, epoch: int, bufsize: int):
    # One rng per (seed, epoch, worker): reproducible, and workers do not mirror each other's order.
    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    rng = random.Random(int(np.random.SeedSequence([seed, epoch, worker]).generate_state(1)[0]))
    yield from wds.shuffle(bufsize, initial=bufsize, rng=rng)(src)


def open_rgb(data: bytes, decode_size: int | None = None) -> Image.Image:
    """Decode image bytes to RGB. With ``decode_size`` (the shorter side the transform needs), a JPEG at
    least twice that size is decoded at a reduced DCT scale (PIL ``draft``: 1/2, 1/4 or 1/8), never below
    ``decode_size`` a side: most of a large JPEG's decode time goes into pixels the resize throws away.
    Other formats, and JPEGs under twice the size, decode in full. Deterministic, like a full decode."""
    img = Image.open(io.BytesIO(data))
    if decode_size is not None and img.format == "JPEG" and min(img.size) >= 2 * decode_size:
        img.draft("RGB", (decode_size, decode_size))  # keeps both sides >= decode_size
    return img.convert("RGB")


def _decode(sample: dict, *, transform: Callable, with_labels: bool, decode_size: int | None = None) -> tuple:
    image = transform(open_rgb(sample["jpg"], decode_size))
    if with_labels:
        return sample["__key__"], image, int(sample["cls"])
    return sample["__key__"], image


def _decode_views(sample: dict, *, views: tuple[Callable, ...], seed: int, epoch: int,
                  with_labels: bool, decode_size: int | None = None) -> tuple:
    key = sample["__key__"]
    pil = open_rgb(sample["jpg"], decode_size)
    in_main = torch.utils.data.get_worker_info() is None  # a worker process has no caller state to keep
    images = tuple(seeded_call(view, pil, view_seed(seed, epoch, key, v), restore=in_main)
                   for v, view in enumerate(views))
    image = images[0] if len(images) == 1 else images
    if with_labels:
        return key, image, int(sample["cls"])
    return key, image


def _collate(samples: list[tuple]) -> tuple:
    keys = [s[0] for s in samples]
    if isinstance(samples[0][1], tuple):  # several views: one stacked tensor per view
        images = tuple(torch.stack(view) for view in zip(*(s[1] for s in samples)))
    else:
        images = torch.stack([s[1] for s in samples])
    if len(samples[0]) == 3:
        return keys, images, torch.tensor([s[2] for s in samples], dtype=torch.long)
    return keys, images


def _as_is(batch: tuple) -> tuple:
    # The batches are collated already; torch's default_convert would turn their tuples into lists.
    return batch


class _Sized(torch.utils.data.IterableDataset):
    """A webdataset pipeline with a length (for progress bars); unlike ``with_length`` it pickles, so
    loader workers can start by spawn/forkserver."""

    def __init__(self, samples, length: int):
        self.samples, self.length = samples, length

    def __iter__(self):
        return iter(self.samples)

    def __len__(self) -> int:
        return self.length


def image_loader(shard_dir: Path, *, transform: Callable | None = None, batch_size: int, shuffle: bool,
                 seed: int = 0, epoch: int = 0, with_labels: bool, num_workers: int = 0,
                 views: tuple[Callable, ...] | None = None, decode_size: int | None = None,
                 device: str | torch.device | None = None) -> torch.utils.data.DataLoader:
    """DataLoader yielding ``(keys, images)`` or, with labels, ``(keys, images, labels)`` batches.

    Give exactly one of ``transform`` and ``views``. ``transform`` is applied as is (a deterministic eval
    transform; no seeding, no lock). ``views`` (training) is a tuple of transforms, each applied to every
    sample (e.g. ``(weak, strong)`` from :mod:`pipeline.data.transforms`): ``images`` is then one tensor for
    one view, or a tuple with one tensor per view. Their random draws are seeded per (seed, epoch, sample
    key, view index) (:func:`seeded_call`): the same tensors for any ``num_workers`` and on every run, new
    ones each epoch, and independent draws for each view.

    ``shuffle=True``: shard order and a ~1000-sample buffer are shuffled, before decoding, from
    (seed, epoch); build a new loader per epoch. ``shuffle=False``: shard order, then written order
    (exactly the manifest key order with ``num_workers <= 1``; workers interleave whole batches).
    Without labels the ``.cls`` members are never even read from the tars. Each worker checks every shard
    it reads against the manifest before shuffling (:func:`checked_keys`): a mismatch raises
    :class:`ShardIntegrityError` in the caller.

    ``decode_size``: the shorter side the transform(s) need (:func:`pipeline.data.transforms.needed_side`);
    large JPEGs are then decoded at a reduced scale (:func:`open_rgb`). ``None`` decodes in full.
    ``num_workers``: a count or ``"auto"`` (:func:`resolve_num_workers`). ``device``: where the batches go;
    on CUDA with workers, batches come in pinned memory and each worker keeps ``PREFETCH_FACTOR`` batches ready.
    """
    if (transform is None) == (views is None):
        raise ValueError("image_loader: give exactly one of transform (eval) and views (seeded training "
                         "views)")
    if views is not None:
        views = tuple(views)
        if not views or not all(callable(v) for v in views):
            raise ValueError(f"image_loader: views must be a non-empty tuple of transforms, got {views!r}")
        if seed < 0 or epoch < 0:
            raise ValueError(f"image_loader: seed and epoch must be >= 0 with views (got {seed}, {epoch})")
    shard_dir = Path(shard_dir)
    plan = shard_plan(shard_dir)
    shards = list(plan)
    if shuffle:
        # Shard shuffle done here, before split_by_worker, so all workers agree on one permutation
        # and each worker gets different shards every epoch.
        shards = [shards[i] for i in np.random.default_rng([seed, epoch]).permutation(len(shards))]
    # A worker without a shard would only idle (and trip webdataset's empty check).
    num_workers = min(resolve_num_workers(num_workers), len(shards))

    suffixes = (".jpg", ".cls") if with_labels else (".jpg",)
    dataset = wds.DataPipeline(wds.SimpleShardList([str(shard_dir / s) for s in shards]), wds.split_by_worker,
                               partial(_checked_samples, plan=plan, suffixes=suffixes))
    if shuffle:
        dataset = dataset.compose(partial(_seeded_shuffle, seed=seed, epoch=epoch, bufsize=SHUFFLE_BUFFER))
    if views is None:
        decode = partial(_decode, transform=transform, with_labels=with_labels, decode_size=decode_size)
    else:
        decode = partial(_decode_views, views=views, seed=seed, epoch=epoch, with_labels=with_labels,
                         decode_size=decode_size)
    dataset = dataset.compose(wds.map(decode), wds.batched(batch_size, collation_fn=_collate, partial=True))

    # Exact batch count: each worker reads shards[w::W] and keeps its own last partial batch.
    per_worker = [sum(len(plan[s]) for s in shards[w::max(num_workers, 1)]) for w in range(max(num_workers, 1))]
    dataset = _Sized(dataset, sum(math.ceil(n / batch_size) for n in per_worker))
    # Stages run their items in Prefect's worker threads; forking a process that has threads can leave
    # the child with a held lock, so workers start from a clean forkserver instead.
    context = None
    if num_workers > 0:
        context = multiprocessing.get_context("forkserver")
        # Workers fork from the forkserver; with these preloaded there, a new loader's workers start with
        # torch and the readers imported instead of importing them again (seconds per loader, and stages
        # build one per domain or epoch). Takes effect when the forkserver starts: first loader in a process.
        context.set_forkserver_preload(FORKSERVER_PRELOAD)
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                                       collate_fn=_as_is, persistent_workers=False,
                                       multiprocessing_context=context, **cuda_loader_options(device, num_workers))


FORKSERVER_PRELOAD = ["pipeline.data.shards", "pipeline.data.transforms"]
PREFETCH_FACTOR = 4  # batches each worker keeps ready on CUDA (torch's default is 2)
MAX_AUTO_WORKERS = 8


def resolve_num_workers(num_workers: int | str) -> int:
    """``runtime.num_workers``: a count, or ``"auto"``: one loader process per core but one (kept for the
    main process, which feeds the accelerator), at most ``MAX_AUTO_WORKERS``, and 0 on a machine with 2 cores
    or fewer, where a worker would only compete with the main process for a core."""
    if num_workers == "auto":
        cores = os.cpu_count() or 1
        return 0 if cores <= 2 else min(cores - 1, MAX_AUTO_WORKERS)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0 or 'auto', got {num_workers!r}")
    return num_workers


def cuda_loader_options(device: str | torch.device | None, num_workers: int) -> dict[str, Any]:
    """DataLoader keywords for batches headed to ``device``: pinned memory on CUDA (faster, asynchronous
    host-to-device copies) and, with workers, a deeper prefetch queue. Neither changes batches or order."""
    if device is None or torch.device(device).type != "cuda":
        return {}
    return {"pin_memory": True, **({"prefetch_factor": PREFETCH_FACTOR} if num_workers > 0 else {})}


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


def shard_classes(*shard_dirs: Path) -> list[str]:
    """The class list (label order) the shards of one or more domains were written with; they must agree.

    Stages that need class names (prompts, stand-ins) read them here, so a list derived from the data
    (mini-DomainNet) or given as a file reaches them through the shards DVC already tracks.
    """
    lists = {str(d): read_manifest(d)["classes"] for d in shard_dirs}
    first = next(iter(lists.values()))
    differ = [d for d, c in lists.items() if c != first]
    if differ:
        raise ValueError(f"shard folders {list(lists)} were written with different class lists; re-run the "
                         "shard stage")
    return list(first)
