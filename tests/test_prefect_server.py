"""Two stages of a finished smoke project report to a real Prefect server (``uda-distill server``'s), and the
UI's view of them is read back through the Prefect client: run names, tags, parameters, per-epoch log lines
and the report's artifacts.

The server has its own PREFECT_HOME and port, and the stages are subprocesses pointed at it through
PREFECT_API_URL, so the session's test server (conftest's harness) is never touched.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterFlowRunId
from prefect.settings import PREFECT_API_URL, temporary_settings

from conftest import copy_project
from pipeline.orchestration.local_server import local_server
from pipeline.orchestration.stage import task_label
from pipeline.smoke import smoke_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STAGE_TIMEOUT_S = 600


@pytest.fixture
def prefect_server(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    with open(tmp_path / "server.log", "w") as log, local_server(port, env=env, output=log) as server:
        yield server  # stopped (its whole process group) when the test ends, passed or failed


def run_stage(project: Path, stage: str, api_url: str, **extra_env: str) -> str:
    """``python -m stages.<stage>`` in `project` with this repository's code, reporting to `api_url`."""
    env = {**smoke_env(project), "PREFECT_API_URL": api_url, "PREFECT_HOME": str(project / ".prefect"),
           "PYTHONPATH": str(REPO),
           # the copy holds the code it was built with: import this repository's instead of the folder's
           "PYTHONSAFEPATH": "1", **extra_env}
    done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=STAGE_TIMEOUT_S)
    assert done.returncode == 0, f"{stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stderr


def test_stage_runs_are_told_apart_in_a_real_prefect_server(smoke_project, tmp_path, prefect_server):
    project = copy_project(smoke_project, tmp_path / "project", light=True)
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["distill"]["epochs"] = 1
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    distill_err = run_stage(project, "distill", prefect_server.api_url, DVC_EXP_NAME="ui-check")
    run_stage(project, "report", prefect_server.api_url)

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        with get_client(sync_client=True) as client:
            runs = {run.name: run for run in client.read_flow_runs()}
            label = task_label(params)
            distill, report = runs[f"distill-ui-check-{label}"], runs[f"report-{label}"]
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[distill.id])))
            keys = ["uda-distill-results-digits", "uda-distill-results-digits-table"]
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    assert len(runs) == 2, sorted(runs)

    method = params["distill"]["method"]
    assert {"stage:distill", f"method:{method}", "dataset:digits", "exp:ui-check",
            *(f"task:{t}" for t in params["tasks"])} <= set(distill.tags)
    assert "stage:report" in report.tags and not any(t.startswith("git:") for t in report.tags)  # not a repo
    shown = distill.parameters["params"]
    assert shown["distill"]["epochs"] == 1 and shown["tasks"] == params["tasks"] and "runtime" in shown
    assert set(report.parameters["params"]) >= {"tasks", "runtime"}

    epoch_lines = [log.message for log in logs if "epoch 1/1 done in" in log.message]
    assert len(epoch_lines) == len(params["tasks"]), [log.message for log in logs]
    assert all(log.task_run_id is not None for log in logs if "epoch 1/1 done in" in log.message)
    assert "epoch 1/1 done in" in distill_err  # and on the console

    by_key = {artifact.key: artifact for artifact in artifacts}
    assert set(by_key) == set(keys)
    markdown = by_key["uda-distill-results-digits"]
    assert markdown.type == "markdown" and markdown.flow_run_id == report.id
    assert markdown.data == (project / params["paths"]["report"] / "results.md").read_text()
    table = by_key["uda-distill-results-digits-table"]
    rows = yaml.safe_load(table.data) if isinstance(table.data, str) else table.data  # JSON is YAML
    assert {(row["task"], row["model"]) for row in rows} >= {(t, "student") for t in params["tasks"]}
