"""The params schema language: leaves (:class:`Field`), blocks with defaults, tagged and named mappings.

Library modules describe the params block they read with these helpers (a method its ``distill.<method>``
block, a loss its ``loss.<loss>`` block inside a method's block); :mod:`pipeline.config` assembles them into the schema of
``params.yaml`` and validates a file once, before any work. Errors name the key, the value found and what
was expected. A field or block with a default may be left out; :func:`validate` then fills the default in,
so the code downstream always sees every key (and the run record shows the values actually used).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable

_MISSING = object()


class ConfigError(ValueError):
    """A params value is missing, of the wrong type or not allowed."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One leaf: a check returning an error text (or None); ``optional`` leaves may be absent, and a
    ``default`` is filled in when they are."""

    check: Callable[[Any], str | None]
    optional: bool = False
    default: Any = _MISSING

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING


def _leaf(check, optional: bool, default: Any) -> Field:
    return Field(check, optional or default is not _MISSING, default)


def integer(minimum: int | None = None, *, optional: bool = False, nullable: bool = False,
            words: tuple[str, ...] = (), default: Any = _MISSING) -> Field:
    """An integer (>= ``minimum``), or null when ``nullable``, or one of the strings ``words``."""
    expected = ("expected an integer" + (f" >= {minimum}" if minimum is not None else "")
                + (" or null" if nullable else "") + "".join(f" or {w!r}" for w in words))

    def check(v):
        if (v is None and nullable) or (isinstance(v, str) and v in words):
            return None
        if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
            return expected
    return _leaf(check, optional, default)


def number(minimum: float | None = None, *, maximum: float | None = None, exclusive_min: bool = False,
           optional: bool = False, default: Any = _MISSING) -> Field:
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if exclusive_min else '>='} {minimum}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    expected = "expected a number" + (" " + " and ".join(bounds) if bounds else "")

    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return expected
        if minimum is not None and (v <= minimum if exclusive_min else v < minimum):
            return expected
        if maximum is not None and v > maximum:
            return expected
    return _leaf(check, optional, default)


def text(choices: tuple[str, ...] | None = None, *, optional: bool = False, nullable: bool = False,
         default: Any = _MISSING) -> Field:
    def check(v):
        if v is None and nullable:
            return None
        if not isinstance(v, str) or not v:
            return "expected a non-empty string" + (f", one of {list(choices)}" if choices else "")
        if choices is not None and v not in choices:
            return f"expected one of {list(choices)}"
    return _leaf(check, optional, default)


def boolean(*, optional: bool = False, default: Any = _MISSING) -> Field:
    return _leaf(lambda v: None if isinstance(v, bool) else "expected true or false", optional, default)


def template_problem(v: Any) -> str | None:
    if not isinstance(v, str) or v.count("{}") != 1 or v.replace("{}", "").count("{") or v.count("}") != 1:
        return "expected a prompt template with exactly one '{}' where the class name goes"
    return None


def template(*, default: Any = _MISSING) -> Field:
    return _leaf(template_problem, False, default)


def text_list(choices: tuple[str, ...] | None = None, min_len: int = 1, is_template: bool = False) -> Field:
    def check(v):
        if not isinstance(v, list) or len(v) < min_len or not all(isinstance(s, str) and s for s in v):
            return f"expected a list of at least {min_len} non-empty strings"
        if is_template and any(template_problem(s) for s in v):
            return f"item {next(s for s in v if template_problem(s))!r}: {template_problem('')}"
        bad = [s for s in v if choices is not None and s not in choices]
        if bad:
            return f"{bad} not allowed; expected items from {list(choices)}"
        if len(set(v)) != len(v):
            return "expected no duplicates"
    return Field(check)


def integer_list(minimum: int = 0, *, nullable: bool = False, default: Any = _MISSING) -> Field:
    """A non-empty list of distinct integers >= `minimum` (or null when `nullable`)."""
    def check(v):
        if v is None and nullable:
            return None
        if (not isinstance(v, list) or not v or len(set(v)) != len(v)
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in v)):
            return f"expected a non-empty list of distinct integers >= {minimum}" + (" or null" if nullable else "")
    return _leaf(check, False, default)


def text_map(*, optional: bool = False) -> Field:
    def check(v):
        if not isinstance(v, dict) or not v or not all(isinstance(k, str) and isinstance(x, str) and x
                                                       for k, x in v.items()):
            return "expected a mapping of names to non-empty strings"
    return Field(check, optional)


class Block:
    """A mapping that may be left out (or given in part): missing keys take their fields' defaults."""

    def __init__(self, schema: dict[str, Any]):
        missing = [k for k, f in schema.items() if not (isinstance(f, Block) or
                                                         (isinstance(f, Field) and f.has_default))]
        if missing:
            raise TypeError(f"every key of a Block needs a default; {missing} have none")
        self.schema = schema

    def defaults(self) -> dict[str, Any]:
        return {k: (f.defaults() if isinstance(f, Block) else copy.deepcopy(f.default))
                for k, f in self.schema.items()}


class Tagged:
    """A mapping whose schema depends on the value of one key (``format`` of a dataset)."""

    def __init__(self, tag: str, schemas: dict[str, dict]):
        self.tag, self.schemas = tag, schemas


class DictOf:
    """A mapping from user-chosen names (datasets, tasks) to entries of one schema."""

    def __init__(self, schema: dict | Field, min_len: int = 1):
        self.schema, self.min_len = schema, min_len


def validate(value: Any, schema: Any, key: str, errors: list[str]) -> None:
    """Append to ``errors`` every problem of ``value`` under ``schema``; fill defaults into ``value`` in place."""
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
        validate(value, sub, key, errors)
    elif isinstance(schema, DictOf):
        if not isinstance(value, dict) or len(value) < schema.min_len:
            errors.append(f"{key}: expected a mapping of at least {schema.min_len} named entries, got {value!r}")
            return
        for name, entry in value.items():
            validate(entry, schema.schema, f"{key}.{name}", errors)
    else:
        fields = schema.schema if isinstance(schema, Block) else schema
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping with keys {sorted(fields)}, got {value!r}")
            return
        for extra in sorted(set(value) - set(fields)):
            errors.append(f"{key + '.' if key else ''}{extra}: unknown key; allowed keys here: {sorted(fields)}")
        for name, sub in fields.items():
            full = f"{key}.{name}" if key else name
            if name not in value:
                if isinstance(sub, Block):
                    value[name] = sub.defaults()
                elif isinstance(sub, Field) and sub.has_default:
                    value[name] = copy.deepcopy(sub.default)
                elif not (isinstance(sub, Field) and sub.optional):
                    errors.append(f"{full}: missing")
                continue
            validate(value[name], sub, full, errors)
