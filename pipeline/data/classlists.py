"""Canonical class lists (label = line index) and the one place prompt names are derived.

Each dataset has ``classlists/<dataset>.txt`` next to this module, one class name per line in label
order. Labels are always derived from these lists, never from a sort of folder names (a case-sensitive
sort silently shifts labels: the original CMKD code's 6.6 % zero-shot DomainNet figure comes from
capitalised folders such as ``The_Eiffel_Tower`` sorting first, ``Wenlve-Zhou/VLP-UDA``).
"""
from __future__ import annotations

from pathlib import Path

CLASSLIST_DIR = Path(__file__).with_name("classlists")


def available_classlists() -> list[str]:
    """Names of the datasets that have a class list."""
    return sorted(p.stem for p in CLASSLIST_DIR.glob("*.txt"))


def load_classlist(dataset: str) -> list[str]:
    """Class names of ``dataset`` in label order (label = index in the returned list)."""
    available = available_classlists()
    # Checking membership (not just file existence) also rejects names such as "../x".
    if dataset not in available:
        raise ValueError(f"no class list for dataset {dataset!r}; available: {', '.join(available) or 'none'}")
    names = [line.strip() for line in (CLASSLIST_DIR / f"{dataset}.txt").read_text("utf-8-sig").splitlines()]
    names = [n for n in names if n]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"class list {dataset!r} has duplicate names: {dupes}")
    return names


def prompt_name(classname: str) -> str:
    """Prompt-ready name of a class: lower-case, underscores as spaces ("Real_World" -> "real world")."""
    return classname.replace("_", " ").lower()
