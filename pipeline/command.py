"""Running a command (a stage's ``python -m stages.<name>``, ``uda-distill``) as a user expects of one.

:func:`entry` turns an expected failure into one line on stderr and exit status 1 (the traceback only on
request), shows the traceback of a defect, and turns Ctrl-C / SIGTERM into "stop every running item at its
next step" (:mod:`pipeline.progress`) and exit status 130 / 143. Kept free of torch and Prefect imports, so
``uda-distill --help`` stays fast.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Any, Callable

from pipeline.progress import Cancelled, request_stop

#: Set to 1 to see the traceback of an expected failure (the same as a stage's ``--debug``).
DEBUG_ENV = "UDA_DISTILL_DEBUG"

# Exception types that mean a defect in the code rather than in the input: shown with their traceback.
_DEFECTS = (AssertionError, AttributeError, ImportError, IndexError, KeyError, NameError, NotImplementedError,
            RecursionError, TypeError, UnboundLocalError, ZeroDivisionError)


def _is_stage_error(exc: BaseException) -> bool:
    # pipeline.orchestration.flows.StageError, recognised by its fields (importing it would import Prefect)
    return isinstance(getattr(exc, "failures", None), dict) and hasattr(exc, "not_run")


def _describe(exc: BaseException) -> str:
    if _is_stage_error(exc):
        lines = [f"item {name}: {_describe(cause)}" for name, cause in exc.failures.items()]
        if exc.not_run:
            lines.append(f"not run because of the failure: {', '.join(exc.not_run)}")
        return "\n  ".join([f"{len(exc.failures)} item(s) failed", *lines])
    return str(exc) or type(exc).__name__


def is_defect(exc: BaseException) -> bool:
    """True for a failure that means a defect in the code (shown with its traceback), not in the input."""
    if _is_stage_error(exc):
        return any(is_defect(cause) for cause in exc.failures.values())
    return isinstance(exc, _DEFECTS)


def debugging() -> bool:
    """True under ``--debug`` (which :func:`entry` turns into ``UDA_DISTILL_DEBUG=1``) or ``UDA_DISTILL_DEBUG=1``."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


KEPT_ON_INTERRUPT = ("its outputs were not written (the previous ones are where they were, unless dvc repro had "
                     "removed them); completed epochs and finished items are kept under paths.checkpoints and "
                     "the next run continues from them")


def entry(stage: str, main: Callable[[list[str] | None], Any], argv: list[str] | None = None, *,
          kept: str = KEPT_ON_INTERRUPT) -> int:
    """Run a stage's ``main(argv)`` as a command; return its exit status.

    0 on success (or the int ``main`` returns); 1 with one line on stderr for an expected failure (params,
    weights, data, integrity, training guards), with the traceback only under ``--debug`` or
    ``UDA_DISTILL_DEBUG=1``; a defect in the code (e.g. a TypeError) always shows its traceback. Ctrl-C
    (130) and SIGTERM (143) stop every running item at its next step (:mod:`pipeline.progress`) and say
    what was kept (``kept``).
    """
    argv = sys.argv[1:] if argv is None else argv
    saved_debug = os.environ.get(DEBUG_ENV)
    if "--debug" in argv:  # through the environment (restored at the end), so code deep down knows too
        os.environ[DEBUG_ENV] = "1"
    debug = debugging()
    received: list[int] = []

    def interrupt(signum, _frame):
        received.append(signum)
        request_stop()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = main(argv)
        return status if isinstance(status, int) else 0
    except (KeyboardInterrupt, Cancelled):
        request_stop()
        name = signal.Signals(received[0]).name if received else "SIGINT"
        print(f"{stage}: interrupted ({name}); {kept}", file=sys.stderr)
        return 128 + (received[0] if received else signal.SIGINT)
    except Exception as exc:  # noqa: BLE001  (every failure ends as one message and a status)
        defect = is_defect(exc)
        if debug or defect:
            traceback.print_exc()
        hint = " (a defect: please report it with the traceback above)" if defect else (
            "" if debug else f"\n  (pass --debug or set {DEBUG_ENV}=1 for the traceback)")
        print(f"{stage}: error: {_describe(exc)}{hint}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if saved_debug is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = saved_debug
