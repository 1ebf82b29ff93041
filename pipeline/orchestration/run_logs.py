"""Where a stage's log lines go: the project's own lines to the Prefect run logs too, and expected failures
to the console as the stage's one error line instead of Prefect's tracebacks.

The project logs through ``logging.getLogger("pipeline...")`` (per-epoch lines, resume decisions). Those
records already reach the console (Prefect's handler on the root logger); :func:`configure_run_logs`
also sends the ones logged inside a flow or task run to that run's logs in the UI, and keeps Prefect from
printing a traceback for an expected failure, which :func:`pipeline.command.entry` reports in one line.
"""
from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_LOGGING_EXTRA_LOGGERS

from pipeline.command import debugging, is_defect

PROJECT_LOGGER = "pipeline"
# Prefect's loggers of flow and task runs (get_run_logger and the engines' state lines log there).
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class RunLogHandler(APILogHandler):
    """Prefect's API log handler, for records logged inside a flow or task run only: outside one there is no
    run to attach them to (Prefect's own handler would warn about every such record)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            super().emit(record)


class QuietExpectedFailures(logging.Filter):
    """Console filter: drops the records of a failing run (Prefect's ERROR state lines, tracebacks of an
    expected failure); the stage's entry prints one line for it. The UI keeps them, and ``--debug`` /
    ``UDA_DISTILL_DEBUG=1`` shows them on the console too. A defect's traceback is always kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if debugging() or record.name not in RUN_LOGGERS or record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return exc is not None and is_defect(exc)


def configure_run_logs() -> None:
    """Send the project's log records to the run logs and quiet expected failures on the console (idempotent;
    after Prefect configured logging, which importing prefect does)."""
    project = logging.getLogger(PROJECT_LOGGER)
    project.setLevel(logging.INFO)  # Prefect leaves the root at WARNING, which would drop per-epoch lines
    # A user who listed the package in PREFECT_LOGGING_EXTRA_LOGGERS already has Prefect's handler on it.
    if PROJECT_LOGGER not in PREFECT_LOGGING_EXTRA_LOGGERS.value() and \
            not any(isinstance(h, RunLogHandler) for h in project.handlers):
        project.addHandler(RunLogHandler())
    for handler in logging.getLogger().handlers:  # the console handler(s): Prefect's, or a basicConfig one
        if isinstance(handler, logging.StreamHandler) and \
                not any(isinstance(f, QuietExpectedFailures) for f in handler.filters):
            handler.addFilter(QuietExpectedFailures())
