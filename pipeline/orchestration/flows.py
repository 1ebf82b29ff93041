"""Run a stage's work items as one Prefect flow: a task per item, a device per task, retries for
transient failures only.

Two executors (``runtime.executor``): ``local`` runs the items on threads of the stage process, one per
visible GPU (a slot pool hands each item its device); ``dask`` hands them to Dask workers through
``prefect-dask``'s ``DaskTaskRunner`` (:mod:`pipeline.orchestration.dask`), one GPU item per worker, the
item's device being the GPU its worker was started on. Either way the stage process stays the only writer of
its outputs: items write into the stage's temporary folder (on a filesystem every worker shares) and return
small results.

No Prefect result caching: DVC's lock and run-cache already decide what re-runs, and two caches
would disagree. Without ``PREFECT_API_URL`` the flow reports to a temporary server tied to the stage
process (:mod:`pipeline.orchestration.server`); Dask workers need a lasting one.
"""
from __future__ import annotations

import contextlib
import errno
import threading
import uuid
from typing import Any, Callable, ContextManager

import pipeline  # noqa: F401  (environment defaults and the torchvision guard before torch)
import torch
from prefect import flow, get_run_logger, task
from prefect import tags as prefect_tags
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import wait
from prefect.runtime import task_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.types.names import BANNED_CHARACTERS

from pipeline.orchestration.devices import DeviceSlots, Executor, visible_devices
from pipeline.orchestration.run_logs import configure_run_logs
from pipeline.orchestration.server import prefect_api
from pipeline.progress import Cancelled, request_stop

# Errnos that say "try again later" rather than "this will never work". ENOSPC is left out on
# purpose: a full disk stays full, and retrying only burns time before the same failure.
TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET})


class TransientError(RuntimeError):
    """Raise (or ``raise TransientError(...) from exc``) for a failure worth retrying."""


class NotStarted(RuntimeError):
    """An item that was not started because another item of the stage had failed for good (fail fast)."""


class StageError(RuntimeError):
    """One or more items of a stage failed for good; `failures` maps item name to its exception (items
    cancelled or not started because of them are listed in `not_run`)."""

    def __init__(self, stage: str, failures: dict[str, BaseException], not_run: list[str] | None = None):
        self.stage = stage
        self.failures = failures
        self.not_run = list(not_run or [])
        details = "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in failures.items())
        skipped = f" (not run: {', '.join(self.not_run)})" if self.not_run else ""
        super().__init__(f"stage {stage!r}: {len(failures)} item(s) failed: {details}{skipped}")


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry can fix (OOM, timeouts, dropped connections, busy resources)."""
    if isinstance(exc, (TransientError, torch.cuda.OutOfMemoryError, TimeoutError, ConnectionError)):
        return True
    # Python maps some errnos to subclasses (ETIMEDOUT -> TimeoutError, EAGAIN -> BlockingIOError);
    # the errno test catches the rest, e.g. EBUSY, whatever class carries it.
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def _retry_if_transient(task_, task_run, state) -> bool:
    # Prefect calls this as fn(task, task_run, state) and only if it is a plain function
    # (inspect.isfunction): a partial or callable object silently means "never retry".
    # The raised exception arrives wrapped as Failed(data=exc).
    exc = state.data
    retry = isinstance(exc, BaseException) and is_transient(exc)
    if not retry and not isinstance(exc, NotStarted):
        get_run_logger().info("%s: not retrying deterministic failure %r", task_run.name, exc)
    return retry


def _run_name(*parts: str) -> Callable[[], str]:
    # Prefect rejects some characters in names, and `.format()`s string names with the run's
    # parameters (so a "{" in a label would break); a callable returning the final name avoids both.
    name = "-".join(p for p in parts if p)
    for char in BANNED_CHARACTERS:
        name = name.replace(char, "_")
    return lambda: name


def run_items(
    stage: str,
    items: dict[str, Any],
    work: Callable[[str, Any, str], Any],
    *,
    devices: list[str] | None = None,
    retries: int = 2,
    retry_delay_s: float = 5.0,
    run_name: str = "",
    parameters: dict[str, Any] | None = None,
    tags: list[str] | None = None,
    executor: Executor | None = None,
    on_gpu: bool = True,
) -> dict[str, Any]:
    """Run ``work(item_name, item, device)`` for every item, as tasks of a Prefect flow named `stage`.

    Items run concurrently, at most one per device (``local``) or one GPU item per Dask worker (``dask``;
    `work` and the items must then pickle, and ``on_gpu=False`` items ask for no GPU). Transient failures
    (`is_transient`) are retried `retries` times, `retry_delay_s` apart; anything else fails at once, and then
    the items not yet started are not started (fail fast; running ones finish, so their work is kept). If any
    item fails for good, raises `StageError` naming the stage, the items and their errors. Returns
    {item_name: result}.

    Called inside :func:`run_in_flow` for the same stage, the items are tasks of that flow; otherwise they
    get a flow of their own, named `run_name` (default: the stage), with `parameters` and `tags`.
    """
    executor = executor or Executor()
    devices = list(devices) if devices is not None else visible_devices(executor.device)
    if not items:
        return {}  # nothing to do: don't pay for a (possibly ephemeral) Prefect server start
    context = FlowRunContext.get()
    run = lambda: _run_tasks(stage, items, work, devices, retries, retry_delay_s, executor, on_gpu)  # noqa: E731
    if context is not None and context.flow is not None and context.flow.name == stage:
        return run()
    return run_in_flow(stage, run, run_name=run_name, parameters=parameters, tags=tags, max_workers=len(devices),
                       executor=executor)


def run_in_flow(stage: str, body: Callable[[], Any], *, run_name: str = "", parameters: dict[str, Any] | None = None,
                tags: list[str] | None = None, max_workers: int = 1, executor: Executor | None = None) -> Any:
    """Return ``body()`` run inside one Prefect flow named `stage` (the stage's parent flow: every
    :func:`run_items` call for `stage` in `body` adds its items as tasks of this flow).

    `parameters` (JSON values) show in the run's Parameters tab as its ``params``; `tags` label the run.
    `executor` picks the task runner: threads (`max_workers`) or Dask workers.
    """
    executor = executor or Executor()
    if executor.kind == "dask":
        from pipeline.orchestration.dask import dask_task_runner  # prefect-dask: only in dask mode

        task_runner = dask_task_runner(executor, workers=max_workers)
    else:
        task_runner = ThreadPoolTaskRunner(max_workers=max_workers)

    @flow(
        name=stage,
        flow_run_name=_run_name(run_name or stage),
        task_runner=task_runner,
        persist_result=False,
        validate_parameters=False,  # shown as given; they were validated with params.yaml
    )
    def stage_flow(params: dict[str, Any]) -> Any:  # noqa: ARG001  (recorded by Prefect, read by the UI)
        return body()  # Prefect itself logs the run's UI address ("View at ...") when there is a UI

    with prefect_api(require_server=executor.kind == "dask"):
        configure_run_logs()
        with prefect_tags(*(tags or [])):
            return stage_flow(params=parameters or {})


class _Threads:
    """Placement of the ``local`` executor: a device slot per item, fail-fast through a thread event."""

    def __init__(self, devices: list[str]):
        self._slots = DeviceSlots(devices)
        self._failed = threading.Event()

    def device(self) -> ContextManager[str]:
        return self._slots.acquire()

    def failed(self) -> bool:
        return self._failed.is_set()

    def fail(self) -> None:
        self._failed.set()


def _run_tasks(stage: str, items: dict[str, Any], work: Callable[[str, Any, str], Any], devices: list[str],
               retries: int, retry_delay_s: float, executor: Executor, on_gpu: bool) -> dict[str, Any]:
    """Inside the stage's flow: one task per item, a device per task (see :func:`run_items`)."""
    if executor.kind == "dask":
        from pipeline.orchestration.dask import WorkerPlacement, gpu_annotation

        placement: Any = WorkerPlacement(f"{stage}-failed-{uuid.uuid4().hex}", executor.device, on_gpu)
        annotate = gpu_annotation if on_gpu else contextlib.nullcontext
    else:
        placement, annotate = _Threads(devices), contextlib.nullcontext

    def run_item(item_name: str) -> Any:
        logger = get_run_logger()
        # The device is taken per attempt, so an item waiting out a retry delay holds none.
        with placement.device() as device:
            if placement.failed():
                raise NotStarted(f"not started: another item of stage {stage!r} failed")
            logger.info("stage %s: item %s on %s", stage, item_name, device)
            try:
                return work(item_name, items[item_name], device)
            except BaseException as exc:
                if device.startswith("cuda"):  # give a retry (e.g. after CUDA OOM) the memory back
                    torch.cuda.empty_cache()
                if not is_transient(exc) or task_run.run_count > retries:
                    placement.fail()
                raise

    # Items stay in this closure, never in Prefect parameters: they need not be JSON-serialisable (under Dask
    # the closure travels to the worker by cloudpickle).
    item_task = task(
        run_item,
        name=stage,
        retries=retries,
        retry_delay_seconds=retry_delay_s,
        retry_condition_fn=_retry_if_transient,
        cache_policy=NO_CACHE,
        persist_result=False,
    )
    logger = get_run_logger()
    logger.info("stage %s: %d item(s) on %s", stage, len(items),
                f"Dask workers ({executor.dask_address or 'a local cluster'})" if executor.kind == "dask" else devices)
    with annotate():  # Dask reads resource annotations at submit time
        futures = {name: item_task.with_options(task_run_name=_run_name(stage, name)).submit(name) for name in items}
    try:
        wait(list(futures.values()))
    except BaseException:
        # Ctrl-C, or SIGTERM turned by Prefect's own handler into its TerminationSignal: the running items
        # stop at their next step instead of being awaited to their end by the task runner's shutdown.
        request_stop()
        raise
    results: dict[str, Any] = {}
    failures: dict[str, BaseException] = {}
    not_run: list[str] = []
    for name, future in futures.items():
        try:
            results[name] = future.result()
        except (NotStarted, Cancelled):
            not_run.append(name)
        except Exception as exc:  # collect every failure, so one report names them all
            failures[name] = exc
    if failures:
        raise StageError(stage, failures, not_run) from next(iter(failures.values()))
    if not_run:  # cancelled (interrupt) with no failure of their own
        raise Cancelled(f"stage {stage!r}: items {', '.join(not_run)} were stopped")
    logger.info("stage %s: %d item(s) done", stage, len(results))
    return results
