"""What a stage's Prefect runs look like in the UI: names, tags, parameters, run logs, artifacts, and the
console and server settings around them. Runs go to the session's test server (conftest's harness) and are
read back through the Prefect client."""
import io
import logging
import subprocess

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogWorker
from prefect.runtime import flow_run
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from pipeline.orchestration import stage as stage_mod
from pipeline.orchestration.artifacts import artifact_keys, result_rows
from pipeline.orchestration.run_logs import QuietExpectedFailures
from pipeline.orchestration.server import STARTUP_TIMEOUT_S, startup_timeout
from pipeline.orchestration.stage import flow_run_name, flow_run_tags, git_revision, run_stage_flow, run_stage_items
from pipeline.progress import progress

PARAMS = {
    "tasks": {"usps_to_mnist": {"dataset": "digits", "source": "usps", "target": "mnist"},
              "printed_to_mnist": {"dataset": "digits", "source": "printed", "target": "mnist"}},
    "distill": {"method": "promptkd", "epochs": 2},
    "runtime": {"device": "cpu", "retries": 0, "retry_delay_s": 0.0},
}


def test_run_name_has_the_dvc_experiment_when_there_is_one(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert flow_run_name("distill", "digits-a+b") == "distill-digits-a+b"
    monkeypatch.setenv("DVC_EXP_NAME", "lr-sweep-3")
    assert flow_run_name("distill", "digits-a+b") == "distill-lr-sweep-3-digits-a+b"


def test_tags_name_stage_method_datasets_tasks_experiment_and_revision(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "peaty-cent")
    monkeypatch.setattr(stage_mod, "git_revision", lambda: "abc1234+dirty")
    assert flow_run_tags("distill", PARAMS) == [
        "stage:distill", "method:promptkd", "dataset:digits", "task:usps_to_mnist", "task:printed_to_mnist",
        "exp:peaty-cent", "git:abc1234+dirty"]
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.setattr(stage_mod, "git_revision", lambda: None)  # not a git repository: no git tag
    assert flow_run_tags("report", PARAMS)[-1] == "task:printed_to_mnist"


def test_git_revision_is_the_short_commit_dirty_with_changes_but_not_with_dvc_lock(tmp_path):
    assert git_revision(tmp_path) is None  # not a repository
    git = lambda *args: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                                       check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git("add", "-A")
    git("commit", "-qm", "first")
    head = git("rev-parse", "--short", "HEAD")
    assert git_revision(tmp_path) == head
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # every repro rewrites it
    assert git_revision(tmp_path) == head
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert git_revision(tmp_path) == f"{head}+dirty"


def read_run(flow_run_id):
    APILogWorker.drain_all(timeout=30)  # logs reach the API in the background
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return run, [log.message for log in logs]


def test_a_stage_run_shows_its_name_tags_parameters_and_project_log_lines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # dvc.yaml declaring the stage's keys; not a git repository
    (tmp_path / "dvc.yaml").write_text("stages:\n  distill:\n    cmd: x\n    params: [distill.epochs]\n")
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")

    def work(name, item, device):
        logging.getLogger("pipeline.methods.training").info("task %s: epoch 1/2 done in 0.1 s: loss 1.5", name)
        return flow_run.id

    results = run_stage_items("distill", PARAMS, PARAMS["tasks"], work, label="digits", on_gpu=False)
    run, messages = read_run(results["usps_to_mnist"])

    assert run.name == "distill-my-exp-digits" and run.flow_id is not None
    assert {"stage:distill", "method:promptkd", "dataset:digits", "task:usps_to_mnist", "exp:my-exp"} <= set(run.tags)
    assert run.parameters == {"params": {"distill.epochs": 2, "runtime": PARAMS["runtime"]}}
    assert "task usps_to_mnist: epoch 1/2 done in 0.1 s: loss 1.5" in messages
    assert "task printed_to_mnist: epoch 1/2 done in 0.1 s: loss 1.5" in messages


def test_a_stage_with_steps_runs_one_flow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []

    def body():
        for step in ("domains", "tasks"):
            run_stage_items("features", PARAMS, {f"{step}-1": 0}, lambda *_: seen.append(flow_run.id), label="x")

    run_stage_flow("features", PARAMS, body, label="digits")
    assert len(seen) == 2 and seen[0] == seen[1]


def test_expected_failures_stay_off_the_console_unless_debugging(monkeypatch):
    monkeypatch.delenv("UDA_DISTILL_DEBUG", raising=False)
    quiet = QuietExpectedFailures()

    def record(name, level, exc=None):
        return logging.LogRecord(name, level, __file__, 1, "msg", None, (type(exc), exc, None) if exc else None)

    assert not quiet.filter(record("prefect.flow_runs", logging.ERROR, ValueError("bad value")))
    assert not quiet.filter(record("prefect.task_runs", logging.ERROR))  # "Finished in state Failed(...)"
    assert quiet.filter(record("prefect.flow_runs", logging.ERROR, TypeError("a defect")))  # traceback kept
    assert quiet.filter(record("prefect.flow_runs", logging.INFO))
    assert quiet.filter(record("pipeline.resume", logging.WARNING))
    monkeypatch.setenv("UDA_DISTILL_DEBUG", "1")
    assert quiet.filter(record("prefect.flow_runs", logging.ERROR, ValueError("bad value")))


def test_ephemeral_startup_timeout_is_ours_unless_the_user_set_one():
    assert startup_timeout() == STARTUP_TIMEOUT_S
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 7}):
        assert startup_timeout() == 7  # lower than ours: the user's choice still wins


def test_progress_bars_are_off_when_the_output_is_not_a_terminal():
    stream = io.StringIO()  # not a tty
    assert list(progress(range(3), desc="quiet", file=stream)) == [0, 1, 2]
    assert stream.getvalue() == ""


def test_artifact_keys_and_rows_from_the_results():
    params = {"tasks": {"a": {"dataset": "Office_31"}, "b": {"dataset": "digits"}}}
    assert artifact_keys(params) == {"markdown": "uda-distill-results-office-31-digits",
                                     "table": "uda-distill-results-office-31-digits-table"}
    results = {"tasks": {"b": {"student": {"target": {"acc": 90.0, "mean_class_acc": 89.5, "best_acc": 91.0}},
                               "parameters": {"trainable": 10}, "extras": {"knn": {"acc": 1.0}}},
                         "a": {"zeroshot_teacher": {"target": {"acc": 50.0, "mean_class_acc": 49.0}}}},
               "method": "promptkd"}
    assert result_rows(results) == [
        {"task": "a", "model": "zeroshot_teacher", "acc": 50.0, "mean_class_acc": 49.0},
        {"task": "b", "model": "student", "acc": 90.0, "mean_class_acc": 89.5}]
    assert result_rows({"tasks": {"c": "moved elsewhere"}}) == [] == result_rows({})


def test_a_temporary_server_that_does_not_start_says_what_to_do(monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from pipeline.orchestration import server

    def no_answer(self, timeout=None):
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.setattr(server._TiedServer, "start", no_answer)
    monkeypatch.setattr(server._TiedServer, "stop", lambda self: None)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # as without a server of one's own
        with pytest.raises(RuntimeError, match=rf"within {STARTUP_TIMEOUT_S} s.*`uda-distill server`.*"
                                               r"PREFECT_API_URL.*PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
            with server.prefect_api():
                pass


def test_uda_distill_server_refuses_a_port_in_use():
    import socket

    from pipeline.orchestration.local_server import local_server

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} .* in use.*--port"):
            with local_server(port):
                pass
