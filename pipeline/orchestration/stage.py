"""What every stage entry module shares: arguments, logging, params, errors, and running its work items.

A stage module in ``stages/`` is thin: ``main(argv)`` calls :func:`start` to read and validate
``params.yaml``, builds a dict of work items, hands them to :func:`run_stage_items` (a Prefect flow that
retries transient failures and places items on GPUs), and writes its outputs through an atomic folder.
``python -m stages.<name>`` runs ``main`` through :func:`entry`, which turns failures into one line and an
exit status.
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from pipeline.artifacts import Artifacts
from pipeline.config import load_params, resolve_keys, stage_declaration
from pipeline.io import write_run_info
from pipeline.models.factory import ModelSpec, check_weights_available
from pipeline.orchestration.devices import visible_devices
from pipeline.orchestration.flows import StageError, run_items
from pipeline.progress import Cancelled, request_stop

#: Set to 1 to see the traceback of an expected failure (the same as a stage's ``--debug``).
DEBUG_ENV = "UDA_DISTILL_DEBUG"

# Exception types that mean a defect in the code rather than in the input: shown with their traceback.
_DEFECTS = (AssertionError, AttributeError, ImportError, IndexError, KeyError, NameError, NotImplementedError,
            RecursionError, TypeError, UnboundLocalError, ZeroDivisionError)

_STAGE_LOCKS: dict[Path, int] = {}  # lock file -> open descriptor, held until the process exits


def start(stage: str, argv: list[str] | None, description: str) -> dict[str, Any]:
    """Parse ``--params``, configure logging, take the stage's lock and return the validated params."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=description)
    parser.add_argument("--params", default="params.yaml", type=Path,
                        help="params file to read (default: params.yaml in the current folder)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a failure (or set {DEBUG_ENV}=1, e.g. under dvc repro)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(message)s")
    # Once Prefect has configured logging (root at WARNING) basicConfig does nothing: the project's own
    # INFO lines (per-epoch progress, resume decisions) need their level set on the package logger.
    logging.getLogger("pipeline").setLevel(logging.INFO)
    params = load_params(args.params)
    _lock_stage(stage, Path(params["paths"]["checkpoints"]))
    logging.getLogger(__name__).info("stage %s: params from %s", stage, args.params)
    return params


def _lock_stage(stage: str, checkpoints: Path) -> None:
    """One writer per stage and workspace: a second run of the same stage stops at once, naming the first.

    The lock (``flock``) is released by the kernel when the process ends, however it ends.
    """
    path = checkpoints / ".locks" / f"{stage}.lock"
    if path in _STAGE_LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(f"stage {stage} is already running in this workspace (pid {holder}, lock {path}); "
                           "wait for it to finish or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _STAGE_LOCKS[path] = fd


def _describe(exc: BaseException) -> str:
    if isinstance(exc, StageError):
        lines = [f"item {name}: {_describe(cause)}" for name, cause in exc.failures.items()]
        if exc.not_run:
            lines.append(f"not run because of the failure: {', '.join(exc.not_run)}")
        return "\n  ".join([f"{len(exc.failures)} item(s) failed", *lines])
    return str(exc) or type(exc).__name__


def _is_defect(exc: BaseException) -> bool:
    if isinstance(exc, StageError):
        return any(_is_defect(cause) for cause in exc.failures.values())
    return isinstance(exc, _DEFECTS)


def entry(stage: str, main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Run a stage's ``main(argv)`` as a command; return its exit status.

    0 on success; 1 with one line on stderr for an expected failure (params, weights, data, integrity,
    training guards), with the traceback only under ``--debug`` or ``UDA_DISTILL_DEBUG=1``; a defect in the
    code (e.g. a TypeError) always shows its traceback. Ctrl-C (130) and SIGTERM (143) stop every running
    item at its next step (:mod:`pipeline.progress`) and say what was kept.
    """
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    received: list[int] = []

    def interrupt(signum, _frame):
        received.append(signum)
        request_stop()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        main(argv)
        return 0
    except (KeyboardInterrupt, Cancelled):
        request_stop()
        name = signal.Signals(received[0]).name if received else "SIGINT"
        print(f"{stage}: interrupted ({name}); its outputs were not written (the previous ones are where they "
              "were, unless dvc repro had removed them); completed epochs and finished items are kept under "
              "paths.checkpoints and the next run continues from them", file=sys.stderr)
        return 128 + (received[0] if received else signal.SIGINT)
    except Exception as exc:  # noqa: BLE001  (every failure ends as one message and a status)
        defect = _is_defect(exc)
        if debug or defect:
            traceback.print_exc()
        hint = " (a defect: please report it with the traceback above)" if defect else (
            "" if debug else f"\n  (pass --debug or set {DEBUG_ENV}=1 for the traceback)")
        print(f"{stage}: error: {_describe(exc)}{hint}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_stage_items(stage: str, params: dict[str, Any], items: dict[str, Any],
                    work: Callable[[str, Any, str], Any], *, label: str, on_gpu: bool = True) -> dict[str, Any]:
    """Run ``work(name, item, device)`` for every item in a Prefect flow named after the stage.

    ``on_gpu=False`` is for CPU-only work (image building, sharding): one item at a time on the CPU.
    """
    rt = params["runtime"]
    devices = visible_devices(rt["device"]) if on_gpu else ["cpu"]
    return run_items(stage, items, work, devices=devices, retries=rt["retries"],
                     retry_delay_s=rt["retry_delay_s"], run_label=label)


def task_label(params: dict[str, Any]) -> str:
    """Run-name suffix naming the dataset(s) and task(s), e.g. ``digits-usps_to_mnist+printed_to_mnist``."""
    datasets = sorted({t["dataset"] for t in params["tasks"].values()})
    return f"{'+'.join(datasets)}-{'+'.join(params['tasks'])}"


def checked_model_spec(params: dict[str, Any], role: str) -> ModelSpec:
    """The teacher's or student's spec, after checking (before any work) that its weights can be had."""
    spec = ModelSpec.from_params(params["model"][role], role=role, cache_dir=params["model"]["cache_dir"])
    check_weights_available(spec)
    return spec


def shard_dir(params: dict[str, Any], dataset: str, domain: str) -> Path:
    return Artifacts(params["paths"]).shards(dataset, domain)


def record_run(params: dict[str, Any], stage: str, *, dvc_yaml: str | Path = "dvc.yaml") -> Path:
    """Write ``<paths.run_info>/<stage>.json``: the params keys ``dvc.yaml`` declares for the stage (the ones
    it reads), the execution settings under ``runtime``, and package versions.

    Kept outside the stage's data outputs on purpose: a record that differs between machines must not
    change the hash of what the next stage depends on.
    """
    declared = stage_declaration(stage, dvc_yaml).get("params", [])
    resolved = resolve_keys(params, [k for k in declared if isinstance(k, str)] + ["runtime"])
    return write_run_info(Artifacts(params["paths"]).run_info(stage), stage=stage, params=resolved)
