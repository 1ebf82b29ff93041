"""External datasets: the benchmark table (``benchmarks.yaml``) and one ``data.datasets`` params entry
turned into class lists and per-domain samples.

Formats: the benchmarks in ``benchmarks.yaml`` (office31, office_home, visda, domainnet, mini_domainnet)
plus two generic sources, ``folder`` (any class-per-folder tree) and ``image_list`` (any ``relpath label``
files). Nothing here knows a path: the user names the root in params.yaml. Layouts: DATASETS.md.
"""
from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.classlists import CLASSLIST_DIR, available_classlists, load_classlist
from pipeline.data.folders import list_class_tree
from pipeline.data.imagelists import list_samples, read_image_list
from pipeline.data.samples import Sample, Skipped, check_classes, match_class

GENERIC_FORMATS = ("folder", "image_list")
SPLITS = ("all", "train", "test")
HEADLINES = ("acc", "mean_class_acc")
DOCS = "DATASETS.md"


@functools.lru_cache(maxsize=1)
def benchmarks() -> dict[str, dict[str, Any]]:
    """The benchmark table, keyed by format name."""
    return yaml.safe_load(Path(__file__).with_name("benchmarks.yaml").read_text(encoding="utf-8"))


def external_formats() -> tuple[str, ...]:
    return (*benchmarks(), *GENERIC_FORMATS)


def standard_tasks(fmt: str, dataset: str | None = None) -> dict[str, dict[str, str]]:
    """Every standard task of a benchmark: ``{"<source>_to_<target>": {dataset, source, target}}``."""
    bench = benchmarks()[fmt]
    pairs = (itertools.permutations(bench["domains"], 2) if bench["tasks"] == "all_pairs"
             else [tuple(p) for p in bench["tasks"]])
    return {f"{s}_to_{t}": {"dataset": dataset or fmt, "source": s, "target": t} for s, t in pairs}


def headline_metric(ds: dict[str, Any]) -> str:
    """``acc`` or ``mean_class_acc``: the params entry's ``headline``, else the benchmark's, else acc."""
    if "headline" in ds:
        return ds["headline"]
    return benchmarks().get(ds["format"], {}).get("headline", "acc")


def expected_count(ds: dict[str, Any], domain: str) -> int | None:
    """The official image count of a benchmark domain (all images), or None when unknown or not comparable."""
    if ds.get("split", "all") != "all" or _uses_splits(ds):
        return None
    return benchmarks().get(ds["format"], {}).get("counts", {}).get(domain)


def known_domains(ds: dict[str, Any]) -> list[str] | None:
    """The domains a benchmark format allows (None: any name, the generic formats)."""
    bench = benchmarks().get(ds["format"])
    return list(bench["domains"]) if bench else None


def _where(name: str, ds: dict[str, Any], domain: str | None = None) -> str:
    return f"dataset {name!r} (format {ds['format']})" + (f", domain {domain!r}" if domain else "")


def _docs(ds: dict[str, Any]) -> str:
    bench = benchmarks().get(ds["format"])
    section = bench["title"] if bench else ("any image folder" if ds["format"] == "folder" else "any image list")
    return f"see {DOCS}, section '{section}', for where to get it and the expected layout"


def root_of(name: str, ds: dict[str, Any]) -> Path:
    """The dataset root, checked to exist (the error names the dataset, the path and the docs)."""
    root = Path(os.path.expandvars(os.path.expanduser(ds["root"])))
    if not root.is_dir():
        raise FileNotFoundError(f"data.datasets.{name}.root: folder {str(root)!r} does not exist "
                                f"({_where(name, ds)}); {_docs(ds)}")
    return root


def _class_file(name: str, ds: dict[str, Any]) -> list[str]:
    spec = ds["classes"]
    if spec in available_classlists():
        return load_classlist(spec)
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise FileNotFoundError(f"data.datasets.{name}.classes: {spec!r} is neither a class list in "
                                f"{CLASSLIST_DIR} ({available_classlists()}) nor an existing file")
    # utf-8-sig: editors on Windows start the file with a byte-order mark, which is no part of a class name
    return check_classes([line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()])


def _domain_dir(name: str, ds: dict[str, Any], root: Path, domain: str) -> Path:
    if ds["format"] == "folder":
        candidates = [ds.get("folders", {}).get(domain, domain)]
    else:
        candidates = benchmarks()[ds["format"]]["domains"][domain]
    present = set(os.listdir(root))  # exact names, also on case-insensitive file systems
    found = [c for c in candidates if c in present and (root / c).is_dir()]
    if not found:
        raise FileNotFoundError(f"{_where(name, ds, domain)}: no domain folder under {root}; looked for "
                                f"{candidates}; {_docs(ds)}")
    if len(found) > 1:
        raise ValueError(f"{_where(name, ds, domain)}: several folders under {root} could be this domain: "
                         f"{found}; keep one")
    return root / found[0]


def _split_files(name: str, ds: dict[str, Any], root: Path, domain: str) -> list[Path]:
    bench = benchmarks()[ds["format"]]
    split = ds.get("split", "all")
    out = []
    for s in (("train", "test") if split == "all" else (split,)):
        tried = [root / d / f"{domain}_{s}.txt" for d in bench["split_dirs"]]
        hit = next((p for p in tried if p.is_file()), None)
        if hit is None:
            raise FileNotFoundError(f"{_where(name, ds, domain)}: no split file {domain}_{s}.txt; looked for "
                                    f"{[str(p) for p in tried]}; {_docs(ds)}")
        out.append(hit)
    return out


def _uses_splits(ds: dict[str, Any]) -> bool:
    bench = benchmarks().get(ds["format"], {})
    return bench.get("layout") == "splits" or (
        "split_layout" in bench and ds.get("split", "all") != "all")


def dataset_classes(name: str, ds: dict[str, Any]) -> list[str]:
    """The class list (label order) of an external dataset.

    mini_domainnet: the class folders named in the split files of its domains, in the canonical DomainNet
    order, so its ids never depend on a sort of folder names or on the file's own numbering.
    """
    if ds["format"] in GENERIC_FORMATS:
        return _class_file(name, ds)
    bench = benchmarks()[ds["format"]]
    canonical = load_classlist(bench["classlist"])
    if not bench.get("derive_classes"):
        return canonical
    root, seen = root_of(name, ds), set()
    for domain in ds["domains"]:
        for split_file in _split_files(name, ds, root, domain):
            for e in read_image_list(split_file):
                folder = Path(e.relpath).parent.name
                classname = match_class(folder, canonical)
                if classname is None:
                    raise ValueError(f"{split_file}:{e.line}: class folder {folder!r} is not a "
                                     f"{bench['classlist']} class ({len(canonical)} in "
                                     f"{CLASSLIST_DIR / bench['classlist']}.txt)")
                seen.add(classname)
    return [c for c in canonical if c in seen]


def domain_samples(name: str, ds: dict[str, Any], domain: str, classes: list[str]
                   ) -> tuple[list[Sample], list[Skipped], dict[str, Any]]:
    """Samples and skipped files of one domain, and where they came from (paths relative to the root, so
    the same data under another root gives byte-identical shards and manifests)."""
    samples, skipped, source = _domain_samples(name, ds, domain, classes)
    root = root_of(name, ds)
    return samples, skipped, {k: [Path(p).relative_to(root).as_posix() for p in v] if isinstance(v, list)
                               else Path(v).relative_to(root).as_posix() for k, v in source.items()}


def _domain_samples(name: str, ds: dict[str, Any], domain: str, classes: list[str]
                    ) -> tuple[list[Sample], list[Skipped], dict[str, Any]]:
    root, where = root_of(name, ds), _where(name, ds, domain)
    fmt, allow_missing = ds["format"], ds.get("allow_missing_classes", False)
    if fmt == "image_list":
        list_file = root / ds["lists"][domain]
        # With labels from the folder the file may number classes its own way (TLlib's Office-Home lists
        # are not in the class list's order): its numbers need only be one per class folder.
        samples = list_samples(list_file, root, classes, labels=ds.get("labels", "column"), ids="consistent",
                               where=where)
        return samples, [], {"lists": [str(list_file)]}
    bench = benchmarks().get(fmt, {})
    if _uses_splits(ds):
        files = _split_files(name, ds, root, domain)
        full = len(load_classlist(bench["classlist"]))
        samples = [s for f in files for s in list_samples(f, root, classes, labels="folder", ids=bench["list_ids"],
                                                            label_range=full, where=where)]
        return samples, [], {"lists": [str(f) for f in files]}
    domain_dir = _domain_dir(name, ds, root, domain)
    if bench.get("layout") == "list":
        list_file = domain_dir / bench["list_file"]
        samples = list_samples(list_file, domain_dir, classes, labels="folder", ids=bench["list_ids"], where=where)
        return samples, [], {"lists": [str(list_file)]}
    sub = bench.get("images_subdir")
    if sub and (domain_dir / sub).is_dir() and match_class(sub, classes) is None:
        domain_dir = domain_dir / sub
    samples, skipped = list_class_tree(domain_dir, classes, allow_missing_classes=allow_missing, where=where)
    return samples, skipped, {"folder": str(domain_dir)}
