"""Load and validate ``params.yaml`` before any work.

The schema is data (:data:`SCHEMA`): every key a stage may read, with its type and allowed values. Unknown
keys are errors too, so a typo such as ``distill.epoch`` cannot silently fall back to a default. Errors name
the key, the value found and what was expected.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.data.benchmarks import GENERIC_FORMATS, HEADLINES, SPLITS, benchmarks, external_formats
from pipeline.data.classlists import available_classlists

METHODS = ("promptkd", "ekda", "dapl")
LOSS_NAMES = ("kl", "nd", "sinkhorn", "dual_head", "binary_kl")  # pipeline.losses implements each
DATASET_FORMATS = ("digits", *external_formats())
DIGITS_DOMAINS = ("mnist", "usps", "printed", "mnistm")
KD_REDUCTIONS = ("batchmean", "numel")
DEVICE_POLICIES = ("auto", "cpu", "cuda")
PROMPT_INITS = ("word", "random")
LOCATIONS = ("middle", "append")
PRECISIONS = ("fp32", "bf16", "fp16")
FAISS_INDEXES = ("flat_ip",)


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ConfigError(ValueError):
    """A params value is missing, of the wrong type or not allowed."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One leaf of the schema: a check returning an error text (or None), and whether it may be absent."""

    check: Callable[[Any], str | None]
    optional: bool = False


def _int(minimum: int | None = None, optional: bool = False) -> Field:
    expected = "expected an integer" + (f" >= {minimum}" if minimum is not None else "")

    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
            return expected
    return Field(check, optional)


def _float(minimum: float | None = None, optional: bool = False) -> Field:
    expected = "expected a number" + (f" >= {minimum}" if minimum is not None else "")

    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (minimum is not None and v < minimum):
            return expected
    return Field(check, optional)


def _str(choices: tuple[str, ...] | None = None, optional: bool = False, nullable: bool = False) -> Field:
    def check(v):
        if v is None and nullable:
            return None
        if not isinstance(v, str) or not v:
            return "expected a non-empty string" + (f", one of {list(choices)}" if choices else "")
        if choices is not None and v not in choices:
            return f"expected one of {list(choices)}"
    return Field(check, optional)


def _bool(optional: bool = False) -> Field:
    return Field(lambda v: None if isinstance(v, bool) else "expected true or false", optional)


def _template_problem(v: str) -> str | None:
    if not isinstance(v, str) or v.count("{}") != 1 or v.replace("{}", "").count("{") or v.count("}") != 1:
        return "expected a prompt template with exactly one '{}' where the class name goes"
    return None


def _template() -> Field:
    return Field(_template_problem)


def _str_list(choices: tuple[str, ...] | None = None, min_len: int = 1, template: bool = False) -> Field:
    def check(v):
        if not isinstance(v, list) or len(v) < min_len or not all(isinstance(s, str) and s for s in v):
            return f"expected a list of at least {min_len} non-empty strings"
        if template and any(_template_problem(s) for s in v):
            return f"item {next(s for s in v if _template_problem(s))!r}: {_template_problem('')}"
        bad = [s for s in v if choices is not None and s not in choices]
        if bad:
            return f"{bad} not allowed; expected items from {list(choices)}"
        if len(set(v)) != len(v):
            return "expected no duplicates"
    return Field(check)


def _str_map(optional: bool = False) -> Field:
    def check(v):
        if not isinstance(v, dict) or not v or not all(isinstance(k, str) and isinstance(x, str) and x
                                                       for k, x in v.items()):
            return "expected a mapping of names to non-empty strings"
    return Field(check, optional)


class Tagged:
    """A mapping whose schema depends on the value of one key (``format`` of a dataset)."""

    def __init__(self, tag: str, schemas: dict[str, dict]):
        self.tag, self.schemas = tag, schemas


class DictOf:
    """A mapping from user-chosen names (datasets, tasks) to entries of one schema."""

    def __init__(self, schema: dict | Field, min_len: int = 1):
        self.schema, self.min_len = schema, min_len


MODEL = {"name": _str(), "pretrained": _str(optional=True, nullable=True),
         "precision": _str(PRECISIONS, optional=True)}
SGD = {"epochs": _int(1), "batch_size": _int(2), "lr": _float(0.0), "momentum": _float(0.0),
       "weight_decay": _float(0.0)}

LOSS = {"name": _str(LOSS_NAMES), "weight": _float(0.0), "reduction": _str(KD_REDUCTIONS),
        "temperature": _float(1e-6), "nd_weight": _float(0.0), "sinkhorn_weight": _float(0.0),
        "sinkhorn_epsilon": _float(1e-6), "sinkhorn_iters": _int(1), "dual_alpha": _float(0.0),
        "dual_beta": _float(1e-6)}

STUDENT = {"n_tokens": _int(0), "location": _str(LOCATIONS), "depth": _int(0)}  # student visual prompts

# data.datasets entries, by format. External datasets are read from `root` (see DATASETS.md).
DIGITS = {"format": _str(("digits",)), "domains": _str_list(), "per_class": _int(1), "image_size": _int(8)}
_EXTERNAL = {"root": _str(), "domains": _str_list(), "headline": _str(HEADLINES, optional=True)}
_TREE = {"allow_missing_classes": _bool(optional=True)}


def _dataset_schema(fmt: str) -> dict[str, Any]:
    schema = {"format": _str(DATASET_FORMATS), **_EXTERNAL}
    if fmt == "folder":
        return {**schema, **_TREE, "classes": _str(), "folders": _str_map(optional=True)}
    if fmt == "image_list":
        return {**schema, "classes": _str(), "lists": _str_map(), "labels": _str(("column", "folder"), optional=True)}
    bench = benchmarks()[fmt]
    if bench["layout"] == "tree":
        schema.update(_TREE)
    if bench["layout"] == "splits" or "split_layout" in bench:
        schema["split"] = _str(SPLITS, optional=True)
    return schema


DATASET = Tagged("format", {"digits": DIGITS, **{f: _dataset_schema(f) for f in external_formats()}})

SCHEMA: dict[str, Any] = {
    "seed": _int(0),
    "paths": {k: _str() for k in ("raw", "shards", "standins", "prompts", "features", "distill", "evaluate",
                                  "report", "run_info", "checkpoints")},
    "data": {
        "shard_maxcount": _int(1),
        "shuffle_seed": _int(0),
        "shard_workers": _int(0),
        "max_bad_fraction": _float(0.0),
        "datasets": DictOf(DATASET),
    },
    "tasks": DictOf({"dataset": _str(), "source": _str(), "target": _str()}),
    "model": {"cache_dir": _str(nullable=True), "teacher": MODEL, "student": MODEL},
    "standins": {"models": DictOf(_str(), min_len=0), "dataset": _str(), "domains": _str_list(),
                 "templates": _str_list(template=True), "epochs": _int(1), "batch_size": _int(2), "lr": _float(0.0)},
    "prompts": {**SGD, "template": _template(), "n_ctx": _int(0), "init": _str(PROMPT_INITS),
                "class_specific": _bool(), "visual_tokens": _int(0), "visual_location": _str(LOCATIONS),
                "text_weight": _float(0.0), "image_weight": _float(0.0), "kl_weight": _float(0.0),
                "gpa_mean": _float(0.0), "gpa_std": _float(1e-6)},
    "features": {"templates": _str_list(template=True), "batch_size": _int(1), "faiss_index": _str(FAISS_INDEXES)},
    "distill": {**SGD, "method": _str(METHODS), "loss": LOSS, "refine_knn": _int(0),
                "collapse_fraction": _float(0.0), "promptkd": STUDENT,
                "ekda": {**STUDENT, "template": _template(), "n_ctx": _int(1), "init": _str(PROMPT_INITS),
                         "visual_tokens": _int(1), "teacher_lr": _float(0.0), "text_weight": _float(0.0),
                         "image_weight": _float(0.0), "kl_weight": _float(0.0), "ce_weight": _float(0.0),
                         "align_weight": _float(0.0)},
                "dapl": {"n_ctx": _int(1), "n_domain_ctx": _int(1), "class_specific": _bool(),
                         "naive_template": _template(), "threshold": _float(0.0), "temperature": _float(1e-6),
                         "target_weight": _float(0.0)}},
    "evaluate": {"batch_size": _int(1)},
    "runtime": {"device": _str(DEVICE_POLICIES), "num_workers": _int(0), "retries": _int(0),
                "retry_delay_s": _float(0.0), "deterministic": _bool()},
}


def _validate(value: Any, schema: Any, key: str, errors: list[str]) -> None:
    if isinstance(schema, Field):
        problem = schema.check(value)
        if problem:
            errors.append(f"{key}: {problem}, got {value!r} ({type(value).__name__})")
    elif isinstance(schema, Tagged):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping with a {schema.tag!r} key, got {value!r}")
            return
        if schema.tag not in value:
            errors.append(f"{key}.{schema.tag}: missing; one of {list(schema.schemas)}")
            return
        sub = schema.schemas.get(value[schema.tag]) if isinstance(value[schema.tag], str) else None
        if sub is None:
            errors.append(f"{key}.{schema.tag}: expected one of {list(schema.schemas)}, got {value[schema.tag]!r}")
            return
        _validate(value, sub, key, errors)
    elif isinstance(schema, DictOf):
        if not isinstance(value, dict) or len(value) < schema.min_len:
            errors.append(f"{key}: expected a mapping of at least {schema.min_len} named entries, got {value!r}")
            return
        for name, entry in value.items():
            _validate(entry, schema.schema, f"{key}.{name}", errors)
    else:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping with keys {sorted(schema)}, got {value!r}")
            return
        for extra in sorted(set(value) - set(schema)):
            errors.append(f"{key + '.' if key else ''}{extra}: unknown key; allowed keys here: {sorted(schema)}")
        for name, sub in schema.items():
            full = f"{key}.{name}" if key else name
            if name not in value:
                if not (isinstance(sub, Field) and sub.optional):
                    errors.append(f"{full}: missing")
                continue
            _validate(value[name], sub, full, errors)


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
    d = p["distill"]
    for method in ("promptkd", "ekda"):
        if d[method]["n_tokens"] == 0 and d[method]["depth"] not in (0, 1):
            errors.append(f"distill.{method}.depth: deep prompts need distill.{method}.n_tokens > 0")
    if d["ekda"]["n_tokens"] == 0:
        errors.append("distill.ekda.n_tokens: EKDA's student learns visual prompts; expected > 0")
    if not 0.0 < d["collapse_fraction"] <= 1.0:
        errors.append(f"distill.collapse_fraction: expected a fraction in (0, 1], got {d['collapse_fraction']!r}")
    if d["loss"]["dual_alpha"] > 1.0:
        errors.append(f"distill.loss.dual_alpha: expected a weight in [0, 1], got {d['loss']['dual_alpha']!r}")
    pr = p["prompts"]
    if pr["n_ctx"] == 0 and pr["visual_tokens"] == 0:
        errors.append("prompts: n_ctx and visual_tokens are both 0, so nothing would be learned; set either")


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
    _validate(params, SCHEMA, "", errors)
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
    with open(path, encoding="utf-8") as fh:
        try:
            params = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return validate_params(params, source=str(path))


def task_domains(params: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """(dataset, domain) pairs each task touches, keyed ``<dataset>/<domain>``."""
    out = {}
    for task in params["tasks"].values():
        for side in ("source", "target"):
            out[f"{task['dataset']}/{task[side]}"] = (task["dataset"], task[side])
    return out
