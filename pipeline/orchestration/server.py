"""The Prefect API a stage reports to: the user's server, or a temporary one tied to the stage process.

With ``PREFECT_API_URL`` set, flows report there. Otherwise Prefect itself would start a temporary
("ephemeral") server in a subprocess that (a) sits in the terminal's process group, so Ctrl-C kills it
before the stage has finished logging (connection tracebacks), (b) outlives a stage killed with -9
(~200 MB orphaned), and (c) must answer within 20 s, which a busy 2-core machine misses. This module
starts Prefect's own temporary server class instead, in a session of its own, with Linux's parent-death
signal set so the kernel stops it when the stage process dies however it dies, and with a longer startup
wait (unless the user chose one); it drains the log and event workers before stopping it.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import socket
import subprocess
import sys
import threading
import types
from typing import Iterator

import prefect.server.api.server as prefect_server
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync

from pipeline.orchestration.tied_launcher import TIED_LAUNCHER

#: Seconds to wait for the temporary server; Prefect's 20 s default times out on a busy 2-core machine.
#: A user's own PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (environment, profile, prefect.toml) wins.
STARTUP_TIMEOUT_S = 120
TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"

_START_LOCK = threading.Lock()


def _tied_popen(args, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` for the server: own session (a terminal's Ctrl-C reaches only the stage, which
    then stops the server itself) and the tied launcher in front of Prefect's own command line."""
    return subprocess.Popen([sys.executable, "-c", TIED_LAUNCHER, str(os.getpid()), *args[1:]],
                            start_new_session=True, **kwargs)


class _TiedServer(prefect_server.SubprocessASGIServer):
    """Prefect's temporary server; only the way its process starts differs."""

    def _run_uvicorn_command(self) -> subprocess.Popen:
        # Prefect's server module calls `subprocess.Popen(args=[sys.executable, "-m", "uvicorn", ...], env=...)`:
        # the name `subprocess` is rebound in that module only, for this call, under a lock.
        saved = prefect_server.subprocess
        prefect_server.subprocess = types.SimpleNamespace(Popen=_tied_popen)
        try:
            return super()._run_uvicorn_command()
        finally:
            prefect_server.subprocess = saved


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _drain_workers() -> None:
    # As prefect.testing.utilities.prefect_test_harness does: send queued logs and events while the
    # server still listens, so nothing is lost and nothing prints connection errors at exit.
    async def drain() -> None:
        for result in (APILogWorker.drain_all(timeout=10), EventsWorker.drain_all(timeout=10)):
            if inspect.isawaitable(result):
                await result

    with contextlib.suppress(RuntimeError):
        run_coro_as_sync(drain())


def startup_timeout() -> int:
    """Seconds to wait for the temporary server: the user's setting when they made one, else ours."""
    ephemeral = get_current_settings().server.ephemeral
    if "startup_timeout_seconds" in ephemeral.model_fields_set:
        return ephemeral.startup_timeout_seconds
    return STARTUP_TIMEOUT_S


@contextlib.contextmanager
def prefect_api(*, require_server: bool = False) -> Iterator[str]:
    """Yield the API URL the block's flows report to, starting (and at the end stopping) a temporary
    server tied to this process when ``PREFECT_API_URL`` is not set.

    ``require_server`` (Dask workers report their tasks too): no temporary server, which each worker process
    would otherwise start for itself; a missing ``PREFECT_API_URL`` stops with what to do instead."""
    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    if require_server:
        raise RuntimeError("runtime.executor: dask needs a Prefect server that every Dask worker reaches, and "
                           "PREFECT_API_URL is not set: start one with `uda-distill server` (or `prefect server "
                           "start --host 0.0.0.0` for workers on other machines) and export the PREFECT_API_URL it "
                           "prints, in the shell that runs the pipeline and in every worker's")
    timeout = startup_timeout()
    with _START_LOCK:
        server = _TiedServer(port=_free_port())
        try:
            server.start(timeout=timeout)
        except Exception as exc:  # Prefect raises a bare RuntimeError on a timeout
            server.stop()
            raise RuntimeError(
                f"the temporary Prefect server did not start within {timeout} s ({exc}); start a lasting one with "
                f"`uda-distill server` and export the PREFECT_API_URL it prints, or raise {TIMEOUT_SETTING}"
            ) from exc
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:  # also on Ctrl-C: logs still queued would otherwise retry a dead server for a minute
                _drain_workers()
    finally:
        server.stop()

