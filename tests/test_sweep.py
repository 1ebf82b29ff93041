"""``uda-distill sweep``: the -S lists and the checks before anything is submitted (fast), and one whole sweep
on loopback (slow): a copy of the smoke project with a bare git remote and a DVC remote folder, a Prefect
server, two process workers, and two runs that each re-run only the ``validate`` stage (``runtime.retries``
is a params key of that stage alone), whose experiments a fresh clone of the git remote then lists and pulls.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.settings import PREFECT_API_URL, temporary_settings

from conftest import copy_project, descendants, gone
from pipeline.cli import main
from pipeline.orchestration import sweep as sweep_module
from pipeline.orchestration.sweep import (Launched, check_combinations, check_pushed, combinations, dvc_remote,
                                          git_remote_url, run_command, run_env, summarize, sweep)

REPO = Path(__file__).resolve().parents[1]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def dvc(cwd: Path, *args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repository holding this project's params.yaml in one commit."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    git(root, "init", "-q")
    git(root, "add", "params.yaml")
    git(root, "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-q", "-m", "params")
    return root


# ---------------------------------------------------------------- fast: parsing and checks


def test_the_runs_are_the_cartesian_product_of_the_lists():
    assert combinations(["distill.method=promptkd,ekda", "seed=1,2,3"]) == [
        [f"distill.method={m}", f"seed={s}"] for m in ("promptkd", "ekda") for s in (1, 2, 3)]


def test_values_are_parsed_as_dvc_exp_run_parses_them():
    # brackets group a list value, range() expands, another params file keeps its prefix, quotes keep commas
    assert combinations(["seeds=[1,2],[3,4]", "other.yaml:a.b=range(1,3)"]) == [
        ["seeds=[1,2]", "other.yaml:a.b=1"], ["seeds=[1,2]", "other.yaml:a.b=2"],
        ["seeds=[3,4]", "other.yaml:a.b=1"], ["seeds=[3,4]", "other.yaml:a.b=2"]]
    assert combinations(["prompts.template='a, b {}.'"]) == [["prompts.template='a, b {}.'"]]


@pytest.mark.parametrize("sets, expected", [
    ([], "no -S given"),
    (["seed"], "-S 'seed': .*missing EQUAL.*expected key=value or key=v1,v2"),
    (["seed=1,,2"], "-S 'seed=1,,2': .*expected key=value"),
    (["seed=1", "seed=2"], "-S 'seed=2': seed is already swept by -S 'seed=1'"),
    (["seed=glob(*)"], "-S 'seed=glob\\(\\*\\)': Glob override"),
])
def test_a_bad_set_is_one_line_naming_it(sets, expected):
    with pytest.raises(ValueError, match=expected) as err:
        combinations(sets)
    assert "\n" not in str(err.value)


def test_the_command_has_its_help_and_its_line_in_the_listing(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    usage, description = capsys.readouterr().out.split("\n\n")[:2]
    assert usage.startswith("usage: uda-distill sweep") and "--pool POOL" in usage and "PREFECT_API_URL" in description
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "\n    sweep" in capsys.readouterr().out.split("positional arguments:")[1]


def test_without_a_prefect_server_it_says_to_start_one(repo, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(RuntimeError, match="PREFECT_API_URL is not set.*`uda-distill server`.*export"):
            sweep(["seed=1,2"], pool="gpus", project=repo)
        monkeypatch.chdir(repo)
        assert main(["sweep", "-S", "seed=1,2", "--pool", "gpus"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("uda-distill: error: PREFECT_API_URL is not set") and "uda-distill server" in err


def test_a_prefect_server_that_does_not_answer_is_named(repo):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        with pytest.raises(RuntimeError, match=f"the Prefect server at PREFECT_API_URL={url} does not answer"):
            sweep(["seed=1,2"], pool="gpus", project=repo)


def test_a_typo_in_a_key_or_value_stops_before_anything_is_submitted(repo):
    revision = git(repo, "rev-parse", "HEAD")
    check_combinations(repo, revision, [["distill.epochs=1"], ["distill.epochs=2"]])
    with pytest.raises(ValueError, match="-S distill.epoch=1: .*distill.epoch"):
        check_combinations(repo, revision, [["distill.epoch=1"]])
    with pytest.raises(ValueError, match="params.yaml with -S distill.method=nope is invalid"):
        check_combinations(repo, revision, [["distill.method=nope"]])
    with pytest.raises(ValueError, match="other.yaml is not a file of commit"):
        check_combinations(repo, revision, [["other.yaml:a=1"]])


def test_the_commit_must_be_on_the_git_remote(repo, tmp_path):
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(repo, "remote", "add", "origin", "../remote.git")  # relative: made absolute for the other machines
    url = git_remote_url(repo, "origin")
    assert url == str(bare.resolve())
    revision = git(repo, "rev-parse", "HEAD")
    with pytest.raises(ValueError, match="on no branch or tag of .*git push origin HEAD"):
        check_pushed(repo, revision, "origin", url)
    git(repo, "push", "-q", "origin", "HEAD:refs/heads/main")
    check_pushed(repo, revision, "origin", url)
    with pytest.raises(ValueError, match="--git-remote 'upstream': neither a remote .* nor a URL"):
        git_remote_url(repo, "upstream")
    assert git_remote_url(repo, "git@example.org:team/repo.git") == "git@example.org:team/repo.git"


def test_the_dvc_remote_is_the_default_one_or_named(repo, tmp_path):
    dvc(repo, "init", "-q")
    with pytest.raises(ValueError, match="no DVC remote: pass --dvc-remote"):
        dvc_remote(repo, None)
    dvc(repo, "remote", "add", "-d", "--local", "store", str(tmp_path / "store"))
    assert dvc_remote(repo, None) == ("store", str(tmp_path / "store"))
    with pytest.raises(ValueError, match="--dvc-remote 'other': no such DVC remote .*remotes: store"):
        dvc_remote(repo, "other")


def test_a_failed_command_of_a_run_is_named_with_its_last_lines(tmp_path):
    logged = []
    cmd = [sys.executable, "-c", "print('first'); print('the reason'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)^`.*-c .*` failed with exit status 3 in .*the reason$"):
        run_command(cmd, cwd=tmp_path, env=dict(os.environ), log=logged.append)
    assert logged[1:] == ["first", "the reason"]


def test_the_runs_commands_are_not_part_of_the_flow_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "1234")  # set by the worker for the flow run itself
    monkeypatch.delenv("HF_HUB_OFFLINE")
    env = run_env(tmp_path)
    assert "PREFECT__FLOW_RUN_ID" not in env and "HF_HUB_OFFLINE" not in env  # the worker's choice
    assert env["DVC_NO_ANALYTICS"] == "1" and env["PATH"].startswith(str(Path(sys.executable).parent))


def _launched(*states: tuple[str, str, bool]) -> list[Launched]:
    return [Launched(f"sweep-x-{i}", [f"seed={i}"], i, f"sweep-x-{i}", state, message, final)
            for i, (state, message, final) in enumerate(states, start=1)]


def test_the_summary_lists_every_run_and_fails_unless_all_completed():
    lines = []
    assert summarize(_launched(("Completed", "", True), ("Completed", "", True)), finished=True, timeout=None,
                     git_remote="origin", out=lines.append) == 0
    assert lines[-1] == "next: dvc exp pull origin sweep-x-1 sweep-x-2 && dvc exp show"
    assert [line.split()[:3] for line in lines[0].splitlines()[1:]] == [
        ["sweep-x-1", "Completed", "sweep-x-1"], ["sweep-x-2", "Completed", "sweep-x-2"]]
    message = "`dvc exp run ...` failed with exit status 255 in /tmp/x; its last lines:\nRunning stage\nERROR: why\n"
    failed = _launched(("Completed", "", True), ("Failed", message, True))
    with pytest.raises(RuntimeError, match=r"^1 of 2 run\(s\) did not complete: sweep-x-2 \(Failed\); "
                       r"sweep-x-2: `dvc exp run \.\.\.` failed .* its last lines: \.\.\. ERROR: why \(the Prefect UI"):
        summarize(failed, finished=True, timeout=None, git_remote="origin", out=lines.append)
    going = _launched(("Completed", "", True), ("Running", "", False))
    with pytest.raises(RuntimeError, match=r"^1 run\(s\) not finished after --timeout 60 s: sweep-x-2 "):
        summarize(going, finished=False, timeout=60, git_remote="origin", out=lines.append)


# ---------------------------------------------------------------- slow: a whole sweep on loopback

SWEEP_TIMEOUT_S = 480  # both runs, from submission to the end (about 1.5 min each here)
WORKER_QUERY_S = "2"  # how often a worker asks for runs (Prefect's default, 10 s, would idle the test)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop a worker, its group and every process below it (a worker starts each run in a session of its own)."""
    below = descendants(process.pid)
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        for kill, target in [(os.killpg, process.pid), *((os.kill, pid) for pid in below)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(target, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        if gone(below, timeout=grace):
            return


@contextlib.contextmanager
def prefect_server(port: int, pool: str, env: dict[str, str], log):
    """A loopback Prefect server with the pool made before any worker starts (two workers making it at once
    would race)."""
    from prefect.client.orchestration import get_client

    from pipeline.orchestration.local_server import local_server

    with local_server(port, env=env, output=log) as server:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
            sweep_module.ensure_pool(client, pool, out=lambda _line: None)
        yield server


@contextlib.contextmanager
def workers(count: int, pool: str, env: dict[str, str], logs: Path):
    started = []
    try:
        for index in range(count):
            log = open(logs / f"worker-{index}.log", "w")  # noqa: SIM115  (closed at the end, below)
            started.append((subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                 "--limit", "1", "--name", f"gpu-{index}"],
                env={**env, "CUDA_VISIBLE_DEVICES": ""}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True), log))
        yield
    finally:
        for process, log in started:
            _stop(process)
            log.close()


def _experiments(shown) -> dict[str, dict]:
    """{experiment name: its params.yaml} of `dvc exp show --json`, whatever its nesting."""
    found = {}
    if isinstance(shown, dict):
        params = ((shown.get("data") or {}).get("params") or {}).get("params.yaml", {}).get("data")
        if shown.get("name") and params is not None and shown.get("rev") != "workspace":
            found[shown["name"]] = params
        shown = list(shown.values())
    if isinstance(shown, list):
        for item in shown:
            found.update(_experiments(item))
    return found


@pytest.mark.slow
def test_a_sweep_runs_each_combination_on_a_worker_and_pushes_it(smoke_project, tmp_path):
    start = time.monotonic()
    project = copy_project(smoke_project, tmp_path / "project")
    # the runs load the flow from the commit: the project must hold this checkout's sweep code
    shutil.copy(REPO / "pipeline/orchestration/sweep.py", project / "pipeline/orchestration/sweep.py")
    if git(project, "status", "--porcelain"):
        git(project, "add", "-A")
        git(project, "commit", "-q", "-m", "the sweep code of this checkout")
    branch = git(project, "rev-parse", "--abbrev-ref", "HEAD")
    bare, store = tmp_path / "remote.git", tmp_path / "dvc-store"
    git(tmp_path, "init", "-q", "--bare", "-b", branch, str(bare))
    git(project, "remote", "add", "origin", str(bare))
    git(project, "push", "-q", "origin", "HEAD")
    dvc(project, "remote", "add", "-d", "--local", "storage", str(store))
    dvc(project, "push", "-q")
    # one output missing on the remote: only a run's own `dvc push` can put it back
    validate_md5 = next(out["md5"] for out in yaml.safe_load((project / "dvc.lock").read_text())["stages"]
                        ["validate"]["outs"])
    pushed = store / "files" / "md5" / validate_md5[:2] / validate_md5[2:]
    pushed.unlink()

    port, pool = _free_port(), "sweep-test"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": WORKER_QUERY_S,
                "TMPDIR": str(tmp_path / "tmp")})  # where the runs clone the project
    (tmp_path / "tmp").mkdir()
    launcher_env = {**env, "PYTHONPATH": str(REPO), "PYTHONSAFEPATH": "1"}  # this checkout's CLI, not the copy's
    with open(tmp_path / "server.log", "w") as log, \
            prefect_server(port, pool, env, log) as server, workers(2, pool, env, tmp_path):
        setup_s = time.monotonic() - start
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "sweep", "-S", "runtime.retries=1,2", "--pool", pool,
             "--timeout", str(SWEEP_TIMEOUT_S)],
            cwd=project, env=launcher_env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S + 180)
        assert server.process.poll() is None
    sweep_s = time.monotonic() - start - setup_s
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("worker-*.log")))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{logs}"
    print(done.stdout)
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("sweep-") and "Completed" in line]
    assert len(rows) == 2, done.stdout
    names = {row[2]: row[3] for row in rows}  # experiment: its -S
    assert sorted(names.values()) == ["runtime.retries=1", "runtime.retries=2"]
    assert pushed.is_file()  # pushed again by a run
    # one run per worker (each takes one at a time), and each deleted its clone
    assert [log.read_text().count("submitted to infrastructure") for log in sorted(tmp_path.glob("worker-*.log"))] \
        == [1, 1], logs
    assert not list((tmp_path / "tmp").glob("uda-distill-*")), list((tmp_path / "tmp").iterdir())

    # any machine: a fresh clone of the git remote lists both experiments and pulls one's outputs
    fresh = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", str(bare), str(fresh))
    dvc(fresh, "remote", "add", "-d", "--local", "storage", str(store))
    dvc(fresh, "exp", "pull", "--no-cache", "origin")
    experiments = _experiments(json.loads(dvc(fresh, "exp", "show", "--json")))
    assert {name: experiments.get(name, {}).get("runtime", {}).get("retries") for name in names} == {
        name: int(value.split("=")[1]) for name, value in names.items()}, experiments
    first = sorted(names)[0]
    dvc(fresh, "exp", "pull", "--force", "origin", first)  # now with its outputs, from the DVC remote
    dvc(fresh, "exp", "apply", first)
    dvc(fresh, "pull")  # nothing missing
    assert (fresh / "results" / "run_info" / "validate.txt").is_file()
    assert (fresh / "results" / "report" / "results.md").is_file()
    print(f"setup {setup_s:.0f} s, sweep {sweep_s:.0f} s, checks {time.monotonic() - start - setup_s - sweep_s:.0f} s")

