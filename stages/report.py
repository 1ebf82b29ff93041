"""Stage ``report``: one results table (JSON for ``dvc metrics``, Markdown) and the plots; the table is also
published as Prefect artifacts (:mod:`pipeline.orchestration.artifacts`)."""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.artifacts import Artifacts
from pipeline.command import entry
from pipeline.evaluation.report import build_report
from pipeline.io import atomic_dir, read_json
from pipeline.orchestration.stage import record_run, run_stage_items, start, task_label

STAGE = "report"


def main(argv: list[str] | None = None) -> None:
    params = start(STAGE, argv, __doc__)
    artifacts, out = Artifacts(params["paths"]), Path(params["paths"]["report"])

    with atomic_dir(out) as tmp:
        def work(_name, _item, _device):
            from pipeline.orchestration.artifacts import publish_report  # imports Prefect: inside the flow

            metrics = {task: read_json(artifacts.evaluation(task).metrics) for task in params["tasks"]}
            results = build_report(metrics, tmp)
            publish_report(results, (tmp / "results.md").read_text(encoding="utf-8"), params)
            return results

        run_stage_items(STAGE, params, {"report": None}, work, label=task_label(params), on_gpu=False)
    record_run(params, STAGE)


if __name__ == "__main__":
    sys.exit(entry(STAGE, main))
