"""Importer for image-list and split files: one ``relative/path label`` per line.

The path is every token but the last (as TLlib reads them), so paths with spaces survive; blank lines and
lines starting with ``#`` are ignored, and so is a leading UTF-8 byte-order mark. Every problem names the file and line: a line that is not
``<path> <integer>``, a label out of range, a path that names no file, a duplicate path, a class folder
not in the class list, or a label that contradicts the class folder.

How the label is decided (``labels``):

- ``column``: the label column is the class index in ``classes`` (generic lists, paths need no class folder).
- ``folder``: the class is the image's parent folder, matched to ``classes`` by name; the column is only
  cross-checked, per ``ids``: ``equal`` (it must be that class's index: VisDA, DomainNet) or
  ``consistent`` (the file numbers classes its own way, one number per class folder: mini-DomainNet, and
  the generic ``image_list`` format, e.g. TLlib's Office-Home lists).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PurePosixPath

from pipeline.data.samples import Sample, check_classes, match_class

LABEL_SOURCES = ("column", "folder")
ID_CHECKS = ("equal", "consistent")


@dataclasses.dataclass(frozen=True)
class Entry:
    line: int
    relpath: str
    label: int


def read_image_list(list_file: str | os.PathLike) -> list[Entry]:
    """Parse a list file; a malformed line is an error naming the file and line number."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"image list {list_file} does not exist")
    entries = []
    seen: dict[str, int] = {}
    # utf-8-sig: a leading byte-order mark (Windows editors) would otherwise become part of the first path
    for number, raw in enumerate(list_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{list_file}:{number}: expected '<relative image path> <integer label>', got {raw!r}")
        relpath = PurePosixPath(parts[0].strip().replace("\\", "/")).as_posix()
        if relpath.startswith("/") or ".." in PurePosixPath(relpath).parts:
            raise ValueError(f"{list_file}:{number}: the image path must be relative and stay below the root, "
                             f"got {parts[0]!r}")
        if relpath in seen:
            raise ValueError(f"{list_file}:{number}: {relpath!r} is listed twice (first on line {seen[relpath]})")
        seen[relpath] = number
        entries.append(Entry(number, relpath, int(parts[1])))
    return entries


def list_samples(list_file: str | os.PathLike, image_root: str | os.PathLike, classes: list[str], *,
                 labels: str = "column", ids: str = "equal", label_range: int | None = None,
                 where: str = "") -> list[Sample]:
    """Samples of one list file (in file order), images resolved below ``image_root``.

    ``label_range``: the column must lie in ``[0, label_range)`` (default: the number of classes).
    """
    if labels not in LABEL_SOURCES or ids not in ID_CHECKS:
        raise ValueError(f"labels must be one of {LABEL_SOURCES} and ids one of {ID_CHECKS}")
    classes = check_classes(classes)
    prefix = f"{where}: " if where else ""
    list_file, image_root = Path(list_file), Path(image_root)
    label_range = len(classes) if label_range is None else label_range
    label_of = {c: i for i, c in enumerate(classes)}
    col_to_class: dict[int, tuple[str, int]] = {}
    class_to_col: dict[str, tuple[int, int]] = {}
    samples, missing = [], []
    for e in read_image_list(list_file):
        at = f"{prefix}{list_file}:{e.line}"
        if not 0 <= e.label < label_range:
            raise ValueError(f"{at}: label {e.label} is out of range [0, {label_range - 1}] ({label_range} classes)")
        if labels == "column":
            classname = classes[e.label]
        else:
            folder = PurePosixPath(e.relpath).parent.name
            classname = match_class(folder, classes) if folder else None
            if classname is None:
                raise ValueError(f"{at}: class folder {folder!r} of {e.relpath!r} is not in the class list "
                                 f"({len(classes)}): {classes}")
            if ids == "equal" and e.label != label_of[classname]:
                raise ValueError(f"{at}: label {e.label} contradicts the class folder {folder!r}, which is "
                                 f"class {label_of[classname]} in the class list")
            if ids == "consistent":
                other = col_to_class.setdefault(e.label, (classname, e.line))
                back = class_to_col.setdefault(classname, (e.label, e.line))
                if other[0] != classname or back[0] != e.label:
                    raise ValueError(f"{at}: label {e.label} for class folder {folder!r} contradicts line "
                                     f"{other[1] if other[0] != classname else back[1]} (one number per class)")
        path = image_root / e.relpath
        if not path.is_file():
            missing.append(f"{list_file}:{e.line}: {e.relpath}")
            continue
        samples.append(Sample(e.relpath, str(path), label_of[classname], classname))
    if missing:
        raise FileNotFoundError(f"{prefix}{len(missing)} image(s) named in {list_file} do not exist below "
                                f"{image_root}, e.g.\n  " + "\n  ".join(missing[:5]))
    return samples
