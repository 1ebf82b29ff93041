"""Progress bars for long work, which are also where that work stops when the stage is interrupted.

Stage items run in worker threads, and Python delivers Ctrl-C (SIGINT) and SIGTERM to the main thread only:
without help a running item would train to its end before the process could exit. The stage entry point
(:func:`pipeline.orchestration.stage.entry`) calls :func:`request_stop` from its signal handler; every
long loop iterates through :func:`progress`, which raises :class:`Cancelled` at its next step. What an
item had finished before (a completed epoch's resume state, a finished item's outputs) is kept.
"""
from __future__ import annotations

import sys
import threading
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")

_STOP = threading.Event()


class Cancelled(Exception):
    """The stage was asked to stop (Ctrl-C, SIGTERM); the work item stopped at its next step."""


def request_stop() -> None:
    """Ask every loop running under :func:`progress`, in any thread, to stop at its next step."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def clear_stop() -> None:
    """Forget a stop request (for a process that runs a stage again, e.g. a test)."""
    _STOP.clear()


def check_stop() -> None:
    """Raise :class:`Cancelled` when a stop was requested."""
    if _STOP.is_set():
        raise Cancelled("stopped on request (interrupt)")


def bar(iterable: Iterable[T] | None = None, **tqdm_kwargs) -> tqdm:
    """``tqdm(iterable, **tqdm_kwargs)``, drawn only when its output is a terminal.

    In a piped log (DVC's captured output, CI, a Prefect worker) redrawn lines would only clutter the log,
    where the per-epoch log lines already say how far the work got.
    """
    stream = tqdm_kwargs.get("file") or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        tqdm_kwargs["disable"] = True
    return tqdm(iterable, **tqdm_kwargs)


def progress(iterable: Iterable[T], **tqdm_kwargs) -> Iterator[T]:
    """:func:`bar` over ``iterable`` that checks for a stop request before each item."""
    for item in bar(iterable, **tqdm_kwargs):
        check_stop()
        yield item
