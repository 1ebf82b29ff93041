"""Load and validate ``params.yaml`` before any work.

The schema is data (:data:`SCHEMA`, in the language of :mod:`pipeline.schema`): every key a stage may read,
with its type and allowed values. Unknown keys are errors too, so a typo such as ``distill.epoch`` cannot
silently fall back to a default. Errors name the key, the value found and what was expected. The methods'
blocks (``distill.<method>``, with a distilling method's ``loss`` block) come from the method and loss
registries, with the defaults each module declares: a block or key left out gets its default (filled in
here, so stages and run records see every value). Enumerations are imported from the code that implements them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from pipeline.data.benchmarks import GENERIC_FORMATS, HEADLINES, SPLITS, benchmarks, external_formats
from pipeline.data.classlists import available_classlists
from pipeline.data.digits import DOMAINS as DIGITS_DOMAINS
from pipeline.data.gpu_decode import DECODERS
from pipeline.data.transforms import TRAIN_TRANSFORMS
from pipeline.features.cache import FAISS_INDEXES
from pipeline.methods import METHODS
from pipeline.models.factory import PRECISIONS
from pipeline.methods.prompt_kinds import KINDS as PROMPT_KINDS, check as check_prompts
from pipeline.models.prompted import PROMPT_INITS
from pipeline.orchestration.devices import DEVICE_POLICIES, EXECUTORS
from pipeline.schema import (ConfigError, DictOf, Tagged, boolean, integer, integer_list, number, template, text,
                             text_list, text_map, validate)

DATASET_FORMATS = ("digits", *external_formats())


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


MODEL = {"name": text(), "pretrained": text(optional=True, nullable=True),
         "precision": text(PRECISIONS, optional=True)}
LEARNING_RATE = number(0.0, exclusive_min=True)  # 0 would train nothing and still "succeed"
SGD = {"epochs": integer(1), "batch_size": integer(2), "lr": LEARNING_RATE, "momentum": number(0.0),
       "weight_decay": number(0.0)}



# data.datasets entries, by format. External datasets are read from `root` (see DATASETS.md).
DIGITS = {"format": text(("digits",)), "domains": text_list(), "per_class": integer(1), "image_size": integer(8)}
_EXTERNAL = {"root": text(), "domains": text_list(), "headline": text(HEADLINES, optional=True)}
_TREE = {"allow_missing_classes": boolean(optional=True)}


def _dataset_schema(fmt: str) -> dict[str, Any]:
    schema = {"format": text(DATASET_FORMATS), **_EXTERNAL}
    if fmt == "folder":
        return {**schema, **_TREE, "classes": text(), "folders": text_map(optional=True)}
    if fmt == "image_list":
        return {**schema, "classes": text(), "lists": text_map(), "labels": text(("column", "folder"), optional=True)}
    bench = benchmarks()[fmt]
    if bench["layout"] == "tree":
        schema.update(_TREE)
    if bench["layout"] == "splits" or "split_layout" in bench:
        schema["split"] = text(SPLITS, optional=True)
    return schema


DATASET = Tagged("format", {"digits": DIGITS, **{f: _dataset_schema(f) for f in external_formats()}})

SCHEMA: dict[str, Any] = {
    "seed": integer(0),
    "seeds": integer_list(0, nullable=True, default=None),
    "paths": {k: text() for k in ("raw", "shards", "standins", "prompts", "features", "distill", "curves",
                                  "evaluate", "bundles", "report", "run_info", "checkpoints")},
    "data": {
        "shard_maxcount": integer(1),
        "shuffle_seed": integer(0),
        "shard_workers": integer(0),
        "max_bad_fraction": number(0.0),
        "store_max_side": integer(1, nullable=True, default=None),
        "datasets": DictOf(DATASET),
    },
    "tasks": DictOf({"dataset": text(), "source": text(), "target": text()}),
    "model": {"cache_dir": text(nullable=True), "teacher": MODEL, "student": MODEL},
    "standins": {"models": DictOf(text(), min_len=0), "dataset": text(), "domains": text_list(),
                 "templates": text_list(is_template=True), "epochs": integer(1), "batch_size": integer(2), "lr": LEARNING_RATE},
    "prompts": {**SGD, "augment": text(TRAIN_TRANSFORMS, default="dassl"), "kind": text(tuple(PROMPT_KINDS)),
                "template": template(), "init": text(PROMPT_INITS),
                **{name: kind.params for name, kind in PROMPT_KINDS.items()},  # each kind's own block
                "text_weight": number(0.0), "image_weight": number(0.0), "kl_weight": number(0.0),
                "gpa_mean": number(0.0), "gpa_std": number(1e-6)},
    "features": {"templates": text_list(is_template=True), "batch_size": integer(1), "faiss_index": text(FAISS_INDEXES)},
    "distill": {**SGD, "method": text(tuple(METHODS)), "refine_knn": integer(0),
                "collapse_fraction": number(0.0, maximum=1.0, exclusive_min=True),
                **{name: method.params for name, method in METHODS.items()}},  # each method's own block
    "evaluate": {"batch_size": integer(1)},
    "runtime": {"device": text(DEVICE_POLICIES), "num_workers": integer(0, words=("auto",)), "retries": integer(0),
                "retry_delay_s": number(0.0), "deterministic": boolean(),
                "executor": text(EXECUTORS, default="local"), "dask_address": text(nullable=True, default=None),
                "decode": text(DECODERS, default="cpu")},
}


def _cross_checks(p: dict[str, Any], errors: list[str]) -> None:
    datasets = p["data"]["datasets"]
    for name in [*datasets, *p["tasks"]]:  # both become folder names
        if not NAME.fullmatch(name):
            errors.append(f"{name!r}: dataset and task names may use letters, digits, '_' and '-' only")
    known = available_classlists()
    if not 0 <= p["data"]["max_bad_fraction"] < 1:
        errors.append(f"data.max_bad_fraction: expected a fraction in [0, 1), got {p['data']['max_bad_fraction']!r}")
    for name, ds in datasets.items():
        if ds["format"] == "digits":
            if name not in known:
                errors.append(f"data.datasets.{name}: no class list pipeline/data/classlists/{name}.txt; "
                              f"known: {known}")
            bad = [d for d in ds["domains"] if d not in DIGITS_DOMAINS]
            if bad:
                errors.append(f"data.datasets.{name}.domains: unknown digits domain(s) {bad}; "
                              f"allowed: {list(DIGITS_DOMAINS)}")
            continue
        _external_checks(name, ds, errors)
    targets = set()
    for name, task in p["tasks"].items():
        ds = datasets.get(task["dataset"])
        if ds is None:
            errors.append(f"tasks.{name}.dataset: unknown dataset {task['dataset']!r}; allowed: {sorted(datasets)}")
            continue
        for side in ("source", "target"):
            if task[side] not in ds["domains"]:
                errors.append(f"tasks.{name}.{side}: unknown domain {task[side]!r} of dataset {task['dataset']!r}; "
                              f"allowed: {ds['domains']}")
        if task["source"] == task["target"]:
            errors.append(f"tasks.{name}: source and target are both {task['source']!r}; a UDA task needs two "
                          f"different domains")
        targets.add((task["dataset"], task["target"]))
    st = p["standins"]
    if st["models"]:
        ds = datasets.get(st["dataset"])
        if ds is None:
            errors.append(f"standins.dataset: unknown dataset {st['dataset']!r}; allowed: {sorted(datasets)}")
        else:
            for domain in st["domains"]:
                if domain not in ds["domains"]:
                    errors.append(f"standins.domains: {domain!r} is not a domain of {st['dataset']!r}")
                if (st["dataset"], domain) in targets:
                    errors.append(f"standins.domains: {domain!r} is the target of a task; stand-ins must be "
                                  f"pretrained on other domains than the tasks' targets")
    for method in METHODS.values():
        if method.check is not None:
            method.check(p, errors)
    check_prompts(p["prompts"], errors)


def _external_checks(name: str, ds: dict[str, Any], errors: list[str]) -> None:
    key = f"data.datasets.{name}"
    allowed = list(benchmarks()[ds["format"]]["domains"]) if ds["format"] in benchmarks() else None
    for domain in ds["domains"]:
        if allowed is not None and domain not in allowed:
            errors.append(f"{key}.domains: unknown {ds['format']} domain {domain!r}; allowed: {allowed}")
        elif not NAME.fullmatch(domain):
            errors.append(f"{key}.domains: {domain!r} names a folder of shards; use letters, digits, '_' and '-' "
                          "(map it to the folder on disk with `folders`)")
    for field in ("lists", "folders"):
        extra = sorted(set(ds.get(field, {})) - set(ds["domains"]))
        if extra:
            errors.append(f"{key}.{field}: {extra} are not in {key}.domains {ds['domains']}")
    if ds["format"] == "image_list":
        missing = [d for d in ds["domains"] if d not in ds["lists"]]
        if missing:
            errors.append(f"{key}.lists: no list file for domain(s) {missing}")
    if ds["format"] in GENERIC_FORMATS and "/" not in ds["classes"] and not ds["classes"].endswith(".txt") \
            and ds["classes"] not in available_classlists():
        errors.append(f"{key}.classes: {ds['classes']!r} is not a bundled class list {available_classlists()}; "
                      "give one of those or the path of a text file, one class name per line in label order")


def validate_params(params: Any, *, source: str = "params.yaml") -> dict[str, Any]:
    """Return ``params`` if valid, else raise :class:`ConfigError` listing every problem found."""
    errors: list[str] = []
    validate(params, SCHEMA, "", errors)
    if not errors:
        _cross_checks(params, errors)
    if errors:
        raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(errors))
    return params


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found (run from the project root or pass --params)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: an editor's byte-order mark is not a key
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}); "
                          "save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        params = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return validate_params(params, source=str(path))


def task_domains(params: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """(dataset, domain) pairs each task touches, keyed ``<dataset>/<domain>``."""
    out = {}
    for task in params["tasks"].values():
        for side in ("source", "target"):
            out[f"{task['dataset']}/{task[side]}"] = (task["dataset"], task[side])
    return out


def stage_declaration(stage: str, dvc_yaml: str | os.PathLike = "dvc.yaml") -> dict[str, Any]:
    """The stage's entry in ``dvc.yaml`` (empty when there is no such file or stage)."""
    path = Path(dvc_yaml)
    if not path.is_file():
        return {}
    declared = yaml.safe_load(path.read_text()).get("stages", {}).get(stage, {}) or {}
    return declared.get("do", declared)  # a foreach stage declares its keys under `do`


def resolve_keys(params: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``{"a.b": params["a"]["b"], ...}`` for dotted params keys."""
    resolved = {}
    for key in keys:
        node: Any = params
        for part in key.split("."):
            node = node[part]
        resolved[key] = node
    return resolved
