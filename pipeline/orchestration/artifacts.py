"""The report stage's Prefect artifacts: ``results.md`` as Markdown and the results as a table.

Each is published under a key that stays the same across runs of the same dataset(s), so the UI's Artifacts
page shows one entry per key with its history over experiments; the run that made each version links to it.
"""
from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

KEY_PREFIX = "uda-distill-results"


def artifact_keys(params: dict[str, Any]) -> dict[str, str]:
    """{"markdown": key, "table": key} for the run's dataset(s), e.g. ``uda-distill-results-digits`` and
    ``uda-distill-results-digits-table`` (Prefect allows lowercase letters, digits and dashes in keys)."""
    datasets = sorted({t["dataset"] for t in params["tasks"].values()})
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(datasets).lower()).strip("-")
    base = f"{KEY_PREFIX}-{slug}" if slug else KEY_PREFIX
    return {"markdown": base, "table": f"{base}-table"}


def result_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task and model with its target accuracy and mean-class accuracy, from the dict
    ``build_report`` returns. Read defensively: entries that are not ``{model: {"target": {acc, ...}}}``
    (parameter counts, extras, any field added later) are skipped."""
    rows = []
    for task, models in sorted((results.get("tasks") or {}).items()):
        if not isinstance(models, dict):
            continue
        for model, entry in models.items():
            target = entry.get("target") if isinstance(entry, dict) else None
            if isinstance(target, dict) and "acc" in target:
                rows.append({"task": task, "model": model, "acc": target["acc"],
                             "mean_class_acc": target.get("mean_class_acc")})
    return rows


def publish_report(results: dict[str, Any], markdown: str, params: dict[str, Any]) -> dict[str, str]:
    """Publish the report as a Markdown and a table artifact of the current flow run; returns their keys."""
    keys = artifact_keys(params)
    description = f"{flow_run.name}: method {params['distill']['method']}, tasks {', '.join(params['tasks'])}"
    create_markdown_artifact(markdown, key=keys["markdown"], description=description)
    create_table_artifact(result_rows(results), key=keys["table"], description=description)
    return keys
