"""Importer for class-per-folder trees: ``<domain_dir>/<class folder>/.../<image>``.

Class folders are matched to the canonical class list by name (:func:`pipeline.data.samples.match_class`);
an unknown folder is an error naming it, and so is a class without a folder or without an image (unless
``allow_missing_classes``). Hidden entries and stray files beside the class folders are ignored; a file
with a non-image suffix inside a class folder is skipped and reported.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.data.samples import IMAGE_SUFFIXES, JUNK_FILES, Sample, Skipped, check_classes, match_class


def _walk_files(folder: Path) -> list[Path]:
    """Every non-hidden file below ``folder``, in a sorted, platform-independent order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def list_class_tree(domain_dir: str | os.PathLike, classes: list[str], *, allow_missing_classes: bool = False,
                    where: str = "") -> tuple[list[Sample], list[Skipped]]:
    """Samples (sorted by relative path) and skipped files of one domain folder.

    ``where`` prefixes error messages (e.g. ``dataset office_home, domain art``).
    """
    domain_dir = Path(domain_dir)
    classes = check_classes(classes)
    prefix = f"{where}: " if where else ""
    if not domain_dir.is_dir():
        raise FileNotFoundError(f"{prefix}image folder {domain_dir} does not exist")
    folders = sorted(p.name for p in domain_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    matched = {f: match_class(f, classes) for f in folders}
    unknown = [f for f, c in matched.items() if c is None]
    if unknown:
        raise ValueError(f"{prefix}unknown class folder(s) {unknown} in {domain_dir}; expected names from the "
                         f"class list ({len(classes)}): {classes}")
    twice = sorted({c for c in matched.values() if list(matched.values()).count(c) > 1})
    if twice:
        raise ValueError(f"{prefix}several folders in {domain_dir} stand for the same class(es) {twice}: "
                         f"{[f for f, c in matched.items() if c in twice]}")

    label_of = {c: i for i, c in enumerate(classes)}
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    for folder, classname in matched.items():
        for path in _walk_files(domain_dir / folder):
            relpath = path.relative_to(domain_dir).as_posix()
            if path.name.lower() in JUNK_FILES:
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(Skipped(relpath, f"not an image file (suffix {path.suffix or 'none'!r})"))
                continue
            samples.append(Sample(relpath, str(path), label_of[classname], classname))
    samples.sort(key=lambda s: s.relpath)

    present = {s.classname for s in samples}
    empty = [c for c in classes if c in matched.values() and c not in present]
    missing = [c for c in classes if c not in matched.values()]
    if (missing or empty) and not allow_missing_classes:
        parts = []
        if missing:
            parts.append(f"class(es) without a folder: {missing}")
        if empty:
            parts.append(f"class folder(s) without an image: {empty}")
        raise ValueError(f"{prefix}{'; '.join(parts)} in {domain_dir} (set allow_missing_classes: true in the "
                         "dataset's params entry if that is expected)")
    return samples, skipped
