"""``uda-distill server``: a lasting Prefect server on the loopback interface, whose UI keeps every run.

Stage processes report to it once ``PREFECT_API_URL`` is exported; without it each stage starts a temporary
server of its own (:mod:`pipeline.orchestration.server`) whose runs vanish with it. Prefect itself is not
imported here: the server is ``python -m prefect server start`` in a process of its own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Iterator

from pipeline.orchestration.tied_launcher import TIED_LAUNCHER


#: Seconds ``uda-distill server`` waits for a new server's /api/health (its first start creates the database).
HEALTH_WAIT_S = 180


@dataclasses.dataclass
class LocalServer:
    api_url: str  # what PREFECT_API_URL must say
    ui_url: str
    process: subprocess.Popen


@contextlib.contextmanager
def local_server(port: int, *, env: dict[str, str] | None = None, wait_s: float = HEALTH_WAIT_S,
                 output: Any = None) -> Iterator[LocalServer]:
    """Run ``prefect server start --host 127.0.0.1 --port <port>`` (telemetry off) for the block, once
    ``/api/health`` answers; stop it at the end, however the block ends. `env`: the server's environment
    (default: this process's); `output`: where its log goes (default: this terminal)."""
    with socket.socket() as probe:  # a clear message instead of uvicorn's bind error in its log
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} on 127.0.0.1 is already in use (a Prefect server already running?); "
                               "pass another with --port")
    env = {**(os.environ if env is None else env), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    command = ["-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    # The same launcher as the temporary server: stopped by the kernel if this process dies (kill -9 too).
    process = subprocess.Popen([sys.executable, "-c", TIED_LAUNCHER, str(os.getpid()), *command], env=env,
                               start_new_session=True, stdout=output, stderr=subprocess.STDOUT if output else None)
    server = LocalServer(api_url=f"http://127.0.0.1:{port}/api", ui_url=f"http://127.0.0.1:{port}", process=process)
    try:
        _wait_healthy(server, wait_s)
        yield server
    finally:
        _stop_group(process)


def _wait_healthy(server: LocalServer, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with status {server.process.returncode} before it "
                               "answered (its log says why)")
        try:
            with urllib.request.urlopen(f"{server.api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet (URLError and timeouts are OSErrors)
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server did not answer on {server.api_url}/health within {wait_s:.0f} s")


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (Prefect's server runs its services in child processes), then
    SIGKILL to what is left after 30 s."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
            return


def serve(port: int) -> int:
    """``uda-distill server``: a Prefect server on 127.0.0.1:`port` until Ctrl-C; returns an exit status."""
    with local_server(port) as server:
        print(f"\nPrefect server ready. UI: {server.ui_url}\nIn the shell that runs the pipeline:\n"
              f"  export PREFECT_API_URL={server.api_url}\nStop the server with Ctrl-C.", flush=True)
        try:
            status = server.process.wait()
        except KeyboardInterrupt:
            print("stopping the Prefect server", flush=True)
            return 0
    raise RuntimeError(f"the Prefect server stopped by itself (exit status {status}; its log says why)")
