"""What every importer produces: one :class:`Sample` per image, plus files skipped while listing.

Also the one rule that matches a folder name on disk to a canonical class name (:func:`match_class`).
"""
from __future__ import annotations

import dataclasses
import re

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Files that operating systems drop into folders; ignored silently (not counted as bad data).
JUNK_FILES = frozenset({"thumbs.db", "desktop.ini"})


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image: ``relpath`` (below the domain or list root; it names the sample key and the json meta),
    the absolute ``path`` read for the bytes, the label (index in the class list) and its class name."""

    relpath: str
    path: str
    label: int
    classname: str


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A file left out, and why (written to the shard manifest)."""

    relpath: str
    reason: str


def _normalise(name: str) -> str:
    return re.sub(r"[\s_-]+", "_", name.strip()).casefold()


def match_class(folder: str, classes: list[str]) -> str | None:
    """The canonical class name ``folder`` stands for, or None when it names no class.

    An exact match wins; otherwise the match ignores case and treats spaces, ``-`` and ``_`` alike
    (``Back_Pack``, ``the_eiffel_tower``, ``Alarm Clock``), and must then be unique. Labels never come
    from a sort of folder names.
    """
    if folder in classes:
        return folder
    hits = [c for c in classes if _normalise(c) == _normalise(folder)]
    return hits[0] if len(hits) == 1 else None


def check_classes(classes: list[str]) -> list[str]:
    classes = list(classes)
    if not classes:
        raise ValueError("the class list is empty")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate class names in the class list: {dupes}")
    clashes = sorted({c for c in classes if sum(_normalise(o) == _normalise(c) for o in classes) > 1})
    if clashes:
        raise ValueError(f"class names that differ only in case, spaces, '-' or '_': {clashes}")
    return classes
