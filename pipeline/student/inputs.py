"""The INPUT arguments of ``uda-distill predict BUNDLE INPUT...``, resolved into batches of image tensors.

An INPUT may be:

- an image file: anything PIL can open, whatever its suffix (a ``.txt``/``.lst``/``.csv`` file is read as a
  list instead, unless its bytes start with an image signature);
- a folder: every image file below it (suffixes .png .jpg .jpeg .bmp .gif .webp .tif .tiff, any case),
  recursively, sorted by relative path; hidden files and folders (``.name``) are skipped;
- a list file (``.txt``, ``.lst``, ``.csv``): one image path per line, relative to the list's folder; blank
  lines and ``#`` comments are skipped, and fields after the path (``path label``, ``path,label``) ignored;
- a shard folder written by the shard stage (it holds ``manifest.json``): its samples in manifest order,
  named ``<folder>::<key>``.

An INPUT that does not exist, or expands to no image at all, is an :class:`InputError`. A single image
that cannot be read (corrupt, missing from a list, vanished) is not: it comes back as a :class:`Failure`
in the batch where it would have been, so one bad file never ends a long prediction run.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import struct
from pathlib import Path
from typing import Callable, Iterator

import pipeline  # noqa: F401  (installs the torchvision guard before torch-related imports)
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data.imagecheck import sniff
from pipeline.data.samples import IMAGE_SUFFIXES
from pipeline.data.shards import image_loader, shard_keys

LIST_SUFFIXES = frozenset({".txt", ".lst", ".csv"})
EXPECTED = ("expected image files, folders of images, a list file (.txt/.lst/.csv) or a shard folder "
            "(with manifest.json)")
# PIL reports broken data with more than OSError: SyntaxError, EOFError and struct.error come out of
# some of its format parsers, and a decompression bomb is its own Exception subclass.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
_FIELD_SEP = re.compile(r"[\s,]")


class InputError(ValueError):
    """A predict INPUT argument that names nothing usable (no such path, or no image in it)."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """An image that could not be read: its name as shown in the output, and a short reason."""

    name: str
    reason: str


@dataclasses.dataclass
class Batch:
    """Readable images (``names`` and their ``images``, in input order) and the unreadable ones met while
    building it. With no readable image, ``images`` is an empty tensor of shape [0, 0, 0, 0]."""

    names: list[str]
    images: torch.Tensor
    failures: list[Failure]


@dataclasses.dataclass(frozen=True)
class _File:
    name: str
    path: str
    missing: str | None = None  # known at resolve time (a list line naming no file): never opened


@dataclasses.dataclass(frozen=True)
class _Shard:
    name: str
    path: Path
    count: int


class Inputs:
    """The resolved INPUT arguments, in the order given (each expanded in its own order)."""

    def __init__(self, items: list[_File | _Shard]):
        self._items = items

    @classmethod
    def resolve(cls, args: list[str | os.PathLike]) -> "Inputs":
        """Expand every argument; raises :class:`InputError` for one that names no image."""
        items: list[_File | _Shard] = []
        for arg in args:
            items += _resolve_one(os.fspath(arg))
        return cls(items)

    def __len__(self) -> int:
        return sum(item.count if isinstance(item, _Shard) else 1 for item in self._items)

    def batches(self, *, transform: Callable, batch_size: int, num_workers: int = 0) -> Iterator[Batch]:
        """Batches of at most ``batch_size`` images; every image lands in exactly one batch's ``names``
        or ``failures``. A batch may be shorter where plain files give way to a shard folder."""
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0 (got {batch_size}, {num_workers})")
        for is_shard, run in itertools.groupby(self._items, key=lambda item: isinstance(item, _Shard)):
            if is_shard:
                for shard in run:
                    yield from _shard_batches(shard, transform, batch_size, num_workers)
            else:
                yield from _file_batches(list(run), transform, batch_size, num_workers)


# ----------------------------------------------------------------------------------------- resolving


def _resolve_one(arg: str) -> list[_File | _Shard]:
    path = Path(arg)
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return [_resolve_shard(arg, path)]
        return _resolve_folder(arg, path)
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES and not _looks_like_image(path):
            return _resolve_list(arg, path)
        return [_File(arg, arg)]
    what = "not a regular file or folder" if path.exists() else "no such file or folder"
    raise InputError(f"predict input {arg!r}: {what}; {EXPECTED}")


def _looks_like_image(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return sniff(fh.read(16)) is not None
    except OSError:
        return False  # read as a list, which reports the problem with the file's name


def _resolve_shard(arg: str, path: Path) -> _Shard:
    try:
        count = len(shard_keys(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"predict input {arg!r}: unreadable shard manifest {path / 'manifest.json'} "
                         f"({type(exc).__name__}: {exc})") from exc
    if count == 0:
        raise InputError(f"predict input {arg!r}: the shard folder holds no samples; {EXPECTED}")
    return _Shard(str(path), path, count)


def _resolve_folder(arg: str, path: Path) -> list[_File]:
    found, shard_dirs = [], []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if "manifest.json" in filenames and dirpath != str(path):
            shard_dirs.append(os.path.relpath(dirpath, path))
        rel = Path(dirpath).relative_to(path)
        found += [(rel / f).as_posix() for f in filenames
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        # Passing the parent of several shard folders is an easy slip; say what would have worked.
        hint = f" (it holds shard folders {sorted(shard_dirs)[:3]}: pass those)" if shard_dirs else ""
        raise InputError(f"predict input {arg!r}: no image files in this folder{hint}; {EXPECTED}")
    # One sort over whole relative paths, not per folder, so the order is the documented one.
    return [_File(os.path.join(arg, rel), os.path.join(arg, rel)) for rel in sorted(found)]


def _resolve_list(arg: str, path: Path) -> list[_File]:
    try:
        # utf-8-sig: a byte-order mark (Windows editors) would otherwise stick to the first path
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"predict input {arg!r}: cannot read the list file ({exc}); {EXPECTED}") from exc
    base = os.path.dirname(arg)
    items = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry = _listed_path(line, base)
        full = os.path.join(base, entry)
        missing = None if os.path.isfile(full) else f"no such file ({path.name}:{number})"
        items.append(_File(full, full, missing))
    if not items:
        raise InputError(f"predict input {arg!r}: the list file names no image (only blank or # lines); "
                         f"{EXPECTED}")
    return items


def _listed_path(line: str, base: str) -> str:
    """The path part of a list line: the shortest prefix ending before a separator that names a file, so
    ``dir/a b.jpg 3`` still finds a file with a space; when none exists, the first field (to report)."""
    cuts = [m.start() for m in _FIELD_SEP.finditer(line)] + [len(line)]
    for cut in cuts:
        if os.path.isfile(os.path.join(base, line[:cut])):
            return line[:cut]
    return line[:cuts[0]]


# ----------------------------------------------------------------------------------------- reading


class _FileDataset(torch.utils.data.Dataset):
    """``(name, tensor or None, reason or None)`` per file: a worker never raises for bad image data."""

    def __init__(self, files: list[_File], transform: Callable):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str | None]:
        item = self.files[index]
        if item.missing is not None:
            return item.name, None, item.missing
        try:
            with Image.open(item.path) as img:
                rgb = img.convert("RGB")  # decodes in full: truncated data fails here, not in the transform
        except READ_ERRORS as exc:
            return item.name, None, _reason(exc)
        # Outside the try: a transform that fails on a decoded image is a bug, not a bad file.
        return item.name, self.transform(rgb), None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not an image"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image file"
    if isinstance(exc, Image.DecompressionBombError):
        return "too many pixels (decompression bomb limit)"
    return f"unreadable image ({type(exc).__name__}: {exc})"


def _collate(samples: list[tuple]) -> Batch:
    ok = [(name, image) for name, image, _ in samples if image is not None]
    failures = [Failure(name, reason) for name, _, reason in samples if reason is not None]
    images = torch.stack([image for _, image in ok]) if ok else torch.empty(0, 0, 0, 0)
    return Batch([name for name, _ in ok], images, failures)


def _file_batches(files: list[_File], transform: Callable, batch_size: int, num_workers: int
                  ) -> Iterator[Batch]:
    # No more workers than batches: each one costs a process start.
    num_workers = min(num_workers, -(-len(files) // batch_size))
    # Forkserver, as the shard loader does: forking a process that runs threads can hand the child a
    # held lock.
    loader = torch.utils.data.DataLoader(_FileDataset(files, transform), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_collate,
                                         multiprocessing_context="forkserver" if num_workers else None)
    yield from loader


def _shard_batches(shard: _Shard, transform: Callable, batch_size: int, num_workers: int) -> Iterator[Batch]:
    # One worker at most: with more, the shard loader interleaves whole shards' batches, and outputs
    # must come in manifest order. One worker still decodes beside the model.
    loader = image_loader(shard.path, transform=transform, batch_size=batch_size, shuffle=False,
                          with_labels=False, num_workers=min(num_workers, 1))
    for keys, images in loader:
        yield Batch([f"{shard.name}::{key}" for key in keys], images, [])
