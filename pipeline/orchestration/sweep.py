"""``uda-distill sweep``: one ``dvc exp run`` per combination of ``-S`` values, each on a GPU of some machine.

The runs go through a Prefect server (``PREFECT_API_URL``) to a *process* work pool, whose workers the user
starts, one per GPU, each with its own ``CUDA_VISIBLE_DEVICES`` and ``--limit 1``: a process worker gives each
run its own environment, so a run sees the worker's GPU only, and a worker takes one run at a time. Nothing
else is shared between machines but two remotes that every machine must reach: the git remote (the runs
check out the commit the sweep was launched from, and push their experiments back) and the DVC remote (the
runs pull the commit's outputs, so only the stages a combination changes run again, and push theirs).

Each run works in a fresh full clone of its own, with plain ``dvc exp run`` in that clone's workspace: the
clone is private to the run, so nothing collides when two workers share a machine, and ``--temp`` would only
add a second copy of the workspace (and of the pulled outputs) inside it. The flow's own code comes from the
same commit (Prefect's git storage), so a run never mixes the sweep's revision with a worker's older checkout.
The combinations are spelled and expanded as ``dvc exp run --queue -S`` expands them (DVC's own Hydra-grammar
parser: ``key=v1,v2``, ``key=range(1,4)``, quoting), and every combination's params file is validated here,
before any GPU starts on it.

Prefect is imported here at module level (the flow needs its decorator); :mod:`pipeline.cli` imports this
module only when ``sweep`` runs, so ``uda-distill --help`` stays fast.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger

from pipeline.smoke import smoke_env

FLOW_NAME = "uda-distill-sweep"
ENTRYPOINT = "pipeline/orchestration/sweep.py:sweep_run"  # relative to the repository root, at the sweep's commit
DEFAULT_PARAMS = "params.yaml"  # the file of a `-S key=value` that names none (DVC's default)
#: Telemetry off in every run's process (a worker's own environment is the user's to set).
TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}
POLL_S = 5.0  # seconds between two looks at the runs' states
TAIL_LINES = 40  # lines of a failed command's output in its error


# ---------------------------------------------------------------- the -S lists


def _hydra_detail(exc: BaseException) -> str:
    """A Hydra parse error in one line, without its link to the grammar's documentation."""
    cause = exc.__cause__ or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip() and "hydra.cc" not in line]
    return "; ".join(lines) or type(cause).__name__


def combinations(sets: list[str]) -> list[list[str]]:
    """The cartesian product of the ``-S`` lists, as ``dvc exp run -S`` arguments, one list per run.

    ``["distill.method=promptkd,ekda", "seed=1,2"]`` gives four runs, from ``["distill.method=promptkd",
    "seed=1"]`` on; a key of another params file keeps its ``file:`` prefix, as ``dvc exp run -S`` takes it.
    """
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps, to_hydra_overrides

    if not sets:
        raise ValueError("no -S given: a sweep needs at least one key and its values, e.g. -S 'seed=1,2,3'")
    keys: dict[tuple[str, str], str] = {}
    for item in sets:
        try:
            (path, overrides), = to_path_overrides([item]).items()
            (override,) = to_hydra_overrides(overrides)
            get_hydra_sweeps({path: overrides})  # e.g. a glob, which DVC refuses in sweeps
        except Exception as exc:  # noqa: BLE001  (Hydra's and DVC's parse errors, whatever their class)
            raise ValueError(f"-S {item!r}: {_hydra_detail(exc)}; expected key=value or key=v1,v2,... as "
                             "`dvc exp run -S` takes it, e.g. -S 'seed=1,2,3'") from None
        key = (path, override.key_or_group)
        if key in keys:
            raise ValueError(f"-S {item!r}: {override.key_or_group} is already swept by -S {keys[key]!r}; "
                             "give each key once, with all its values: -S 'key=v1,v2'")
        keys[key] = item
    return [[override if path == DEFAULT_PARAMS else f"{path}:{override}"
             for path, overrides in combination.items() for override in overrides]
            for combination in get_hydra_sweeps(to_path_overrides(sets))]


def _git_show(root: Path, revision: str, path: str) -> str:
    done = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"-S {path}:...: {path} is not a file of commit {revision[:12]}")
    return done.stdout


def check_combinations(root: Path, revision: str, runs: list[list[str]]) -> None:
    """Apply each run's overrides to the params files of ``revision`` and validate ``params.yaml`` as its
    ``validate`` stage will: a typo stops the sweep here, not on every GPU."""
    import yaml
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    from pipeline.config import validate_params

    with tempfile.TemporaryDirectory(prefix="uda-distill-sweep-check-") as tmp:
        for overrides in runs:
            for path, file_overrides in to_path_overrides(overrides).items():
                copy = Path(tmp) / Path(path).name
                copy.write_text(_git_show(root, revision, path), encoding="utf-8")
                try:
                    apply_overrides(copy, file_overrides)
                except Exception as exc:  # noqa: BLE001  (DVC's InvalidArgumentError wraps Hydra's reason)
                    raise ValueError(f"-S {' '.join(overrides)}: {_hydra_detail(exc)}") from None
                if path == DEFAULT_PARAMS:
                    validate_params(yaml.safe_load(copy.read_text(encoding="utf-8")),
                                    source=f"{path} with -S {' '.join(overrides)}")


# ---------------------------------------------------------------- the run: one combination on one worker


def run_env(workdir: Path) -> dict[str, str]:
    """The commands' environment: the smoke run's (telemetry off, this interpreter first on PATH), minus the
    Prefect engine's own variables (the stages' flows are runs of their own, not this one), and with the
    worker's choice of ``HF_HUB_OFFLINE`` (a machine that may download weights keeps that right)."""
    env = {key: value for key, value in smoke_env(workdir).items() if not key.startswith("PREFECT__")}
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    else:
        env.pop("HF_HUB_OFFLINE", None)
    return env


def run_command(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Callable[[str], Any]) -> str:
    """Run ``cmd``, each line of its output to ``log``; raise naming the command and its last lines if it fails."""
    shown = " ".join(["dvc", *cmd[3:]] if cmd[:3] == _dvc() else cmd)
    log(f"$ {shown}")
    lines = []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            log(lines[-1])
    if proc.returncode != 0:
        tail = "\n".join(lines[-TAIL_LINES:])
        raise RuntimeError(f"`{shown}` failed with exit status {proc.returncode} in {cwd}; its last lines:\n{tail}")
    return "\n".join(lines)


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def _git_identity(workdir: Path, env: dict[str, str], log: Callable[[str], Any]) -> None:
    """`dvc exp run` commits the experiment: give the clone an author when the machine has none."""
    if subprocess.run(["git", "config", "user.email"], cwd=workdir, env=env, capture_output=True).returncode == 0:
        return
    run_command(["git", "config", "user.name", "uda-distill sweep"], cwd=workdir, env=env, log=log)
    run_command(["git", "config", "user.email", f"sweep@{socket.gethostname()}"], cwd=workdir, env=env, log=log)


@flow(name=FLOW_NAME, log_prints=False)
def sweep_run(git_url: str, revision: str, overrides: list[str], experiment: str, dvc_remote: str,
              dvc_remote_url: str) -> str:
    """One combination of a sweep: clone ``git_url`` at ``revision``, pull its outputs from the DVC remote,
    ``dvc exp run -n <experiment> -S ...``, push the outputs, then the experiment; return its name.

    The clone is deleted after a success and kept (its path logged) after a failure.
    """
    logger = get_run_logger()
    workdir = Path(tempfile.mkdtemp(prefix=f"uda-distill-{experiment}-"))
    env = run_env(workdir)
    logger.info(f"experiment {experiment}: commit {revision[:12]} of {git_url} with -S {' '.join(overrides)} "
                f"in {workdir} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(not set)')})")

    def step(cmd: list[str]) -> str:
        return run_command(cmd, cwd=workdir, env=env, log=logger.info)

    try:
        step(["git", "clone", "--quiet", git_url, str(workdir)])
        step(["git", "-c", "advice.detachedHead=false", "checkout", "--quiet", revision])
        _git_identity(workdir, env, logger.info)
        # the launching machine's URL of the remote, here at the clone's own (local) level: a remote it holds
        # in .dvc/config.local would be missing, and credentials this machine keeps for it still apply
        step(_dvc("remote", "add", "--local", "--force", dvc_remote, dvc_remote_url))
        step(_dvc("pull", "--remote", dvc_remote, "--allow-missing"))  # what is missing is computed again
        step(_dvc("exp", "run", "--name", experiment, *[arg for item in overrides for arg in ("-S", item)]))
        step(_dvc("push", "--remote", dvc_remote))  # outputs first: a pushed experiment's data is there
        step(_dvc("exp", "push", "--no-cache", "origin", experiment))
    except BaseException:
        logger.error(f"the clone is kept for inspection: {workdir}")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    logger.info(f"experiment {experiment} pushed to {git_url} and DVC remote {dvc_remote}")
    return experiment


# ---------------------------------------------------------------- launching: where the sweep starts


def require_api_url() -> str:
    """The Prefect server's API URL; a missing one stops with what to do."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise RuntimeError("PREFECT_API_URL is not set: a sweep sends its runs to the workers through a Prefect "
                           "server; start one with `uda-distill server` (or `prefect server start --host 0.0.0.0` "
                           "for workers on other machines) and export the PREFECT_API_URL it prints, here and in "
                           "every worker's shell")
    return url


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`git {' '.join(args)}` failed in {root}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def git_root(project: Path) -> Path:
    done = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{project} is not in a git repository: a sweep runs a commit, checked out on every "
                           "machine from a git remote")
    return Path(done.stdout.strip())


def git_remote_url(root: Path, remote: str) -> str:
    """The URL behind ``remote`` (a remote's name or a URL); a local path is made absolute."""
    names = _git(root, "remote").split()
    url = _git(root, "remote", "get-url", remote) if remote in names else remote
    if "://" in url or ":" in url.split("/")[0]:  # scheme://... or scp-like user@host:path
        return url
    if remote not in names and not (root / url).exists():
        raise ValueError(f"--git-remote {remote!r}: neither a remote of {root} (remotes: {', '.join(names) or 'none'})"
                         " nor a URL; pass the name or URL of a git remote every machine can reach "
                         "(e.g. git@host:team/repo.git)")
    return str((root / url).resolve())  # a path relative to this checkout means nothing on another machine


def check_pushed(root: Path, revision: str, remote: str, url: str) -> None:
    """Stop unless ``revision`` is reachable from a branch or tag of the git remote (the runs fetch it there)."""
    done = subprocess.run(["git", "ls-remote", "--heads", "--tags", url], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"--git-remote {remote}: `git ls-remote {url}` failed: {done.stderr.strip()}")
    for line in done.stdout.splitlines():
        tip = line.split()[0]
        if subprocess.run(["git", "merge-base", "--is-ancestor", revision, tip], cwd=root,
                          capture_output=True).returncode == 0:
            return
    raise ValueError(f"--git-remote {remote}: commit {revision[:12]} (HEAD) is on no branch or tag of {url}, "
                     f"where the runs check it out: push it first (git push {remote} HEAD), or `git fetch "
                     f"{remote}` if it is there already")


def dvc_remote(root: Path, name: str | None) -> tuple[str, str]:
    """``(name, url)`` of the DVC remote the runs pull from and push to: ``name``, else the default one."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        config = repo.config
        remotes = {key: value.get("url") for key, value in config.get("remote", {}).items()}
        default = config.get("core", {}).get("remote")
    if name is None:
        if not default:
            raise ValueError("no DVC remote: pass --dvc-remote NAME or set a default one (`dvc remote add -d NAME "
                             "URL`); the runs pull the commit's outputs from it and push theirs to it")
        name = default
    if name not in remotes:
        raise ValueError(f"--dvc-remote {name!r}: no such DVC remote in {root} (remotes: "
                         f"{', '.join(sorted(remotes)) or 'none'})")
    return name, remotes[name]


def uncommitted(root: Path) -> bool:
    return bool(_git(root, "status", "--porcelain", "--untracked-files=no"))


def ensure_pool(client: Any, pool: str, out: Callable[[str], Any]) -> None:
    """Create the process work pool ``pool`` if missing; stop if it exists with another type. Say when no
    worker polls it (the runs then wait)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        found = client.read_work_pool(pool)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
        out(f"created the process work pool {pool!r}")
    else:
        if found.type != "process":
            raise ValueError(f"--pool {pool}: a work pool of type {found.type!r}; a sweep needs a process pool "
                             f"(`prefect work-pool create NAME --type process`), whose workers pin one GPU each")
    statuses = [str(getattr(w.status, "value", w.status)) for w in client.read_workers_for_work_pool(pool)]
    if "ONLINE" not in statuses:
        out(f"note: no worker polls the pool {pool!r} now; the runs wait until one starts (on each GPU machine, one "
            f"per GPU: CUDA_VISIBLE_DEVICES=0 prefect worker start --pool {pool} --type process --limit 1)")


def deploy(git_url: str, revision: str, pool: str) -> str:
    """Deploy :func:`sweep_run` from ``git_url`` at ``revision`` to ``pool``; return the deployment's name.

    One deployment per pool and commit: a later sweep of another commit cannot change the code of runs still
    waiting (a worker reads the deployment's source when it starts a run)."""
    from prefect.runner.storage import GitRepository

    name = f"{pool}-{revision[:12]}"
    try:
        remote_flow = sweep_run.from_source(source=GitRepository(url=git_url, commit_sha=revision),
                                            entrypoint=ENTRYPOINT)
    except Exception as exc:  # noqa: BLE001  (a clone, a missing file, an import: all say the same to the user)
        raise RuntimeError(f"cannot load the sweep flow {ENTRYPOINT} of commit {revision[:12]} from {git_url}: "
                           f"{exc}") from exc
    # to_deployment + apply is what flow.deploy() does for code in git storage, without its console table
    remote_flow.to_deployment(name=name, work_pool_name=pool, job_variables={"env": dict(TELEMETRY_OFF)},
                              description=f"uda-distill sweep runs of commit {revision}").apply()
    return f"{FLOW_NAME}/{name}"


@dataclasses.dataclass
class Launched:
    experiment: str
    overrides: list[str]
    flow_run_id: Any
    flow_run_name: str
    state: str = "Scheduled"
    message: str = ""
    final: bool = False


def submit(deployment: str, runs: list[list[str]], *, sweep_id: str, parameters: dict[str, str]) -> list[Launched]:
    """One flow run per combination, returned at once (``timeout=0``)."""
    from prefect.deployments import run_deployment

    launched = []
    for index, overrides in enumerate(runs, start=1):
        experiment = f"{sweep_id}-{index}"
        run = run_deployment(deployment, parameters={**parameters, "overrides": overrides, "experiment": experiment},
                             flow_run_name=experiment, timeout=0, as_subflow=False, tags=[f"sweep:{sweep_id}"])
        launched.append(Launched(experiment, overrides, run.id, run.name))
    return launched


def wait_for(client: Any, launched: list[Launched], *, timeout: float | None,
             out: Callable[[str], Any]) -> bool:
    """Follow the runs until every one is final (True) or ``timeout`` seconds passed (False); each state
    change is printed."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = None if timeout is None else time.monotonic() + timeout
    by_id = {item.flow_run_id: item for item in launched}
    try:
        while True:
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(by_id)))):
                item = by_id[run.id]
                state = run.state.name if run.state else "Unknown"
                if state != item.state:
                    out(f"  {item.flow_run_name}: {state}")
                item.state, item.message = state, (run.state.message or "") if run.state else ""
                item.final = run.state is not None and run.state.is_final()
            if all(item.final for item in launched):
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        out("stopped following the runs; they go on on the workers (the Prefect UI shows them; "
            "`prefect flow-run cancel ID` cancels one)")
        raise


def table(launched: list[Launched]) -> str:
    rows = [("flow run", "state", "experiment", "-S")] + [
        (item.flow_run_name, item.state, item.experiment, " ".join(item.overrides)) for item in launched]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)


def sweep(sets: list[str], *, pool: str, git_remote: str = "origin", dvc_remote_name: str | None = None,
          wait: bool = True, timeout: float | None = None, project: Path | None = None,
          out: Callable[[str], Any] = print) -> int:
    """``uda-distill sweep``: deploy, submit one run per combination, and (``wait``) follow them to the end.

    Returns 0 when every run completed; raises (one line) when one did not, or when ``timeout`` passed first.
    """
    from prefect.client.orchestration import get_client

    runs = combinations(sets)
    api_url = require_api_url()
    with get_client(sync_client=True) as client:
        if (problem := client.api_healthcheck()) is not None:
            raise RuntimeError(f"the Prefect server at PREFECT_API_URL={api_url} does not answer ({problem}); "
                               "start it with `uda-distill server` and export the PREFECT_API_URL it prints")
        root = git_root(project or Path.cwd())
        revision = _git(root, "rev-parse", "HEAD")
        git_url = git_remote_url(root, git_remote)
        check_pushed(root, revision, git_remote, git_url)
        remote_name, remote_url = dvc_remote(root, dvc_remote_name)
        check_combinations(root, revision, runs)
        ensure_pool(client, pool, out)
        if uncommitted(root):
            out(f"note: uncommitted changes are not part of the sweep; it runs commit {revision[:12]}")
        deployment = deploy(git_url, revision, pool)
        sweep_id = f"sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        launched = submit(deployment, runs, sweep_id=sweep_id, parameters={
            "git_url": git_url, "revision": revision, "dvc_remote": remote_name, "dvc_remote_url": remote_url})
        out(f"{sweep_id}: {len(launched)} run(s) of commit {revision[:12]} on pool {pool!r} (deployment "
            f"{deployment}; Prefect server {api_url})")
        for item in launched:
            out(f"  {item.flow_run_name}: -S {' '.join(item.overrides)}")
        if not wait:
            out(table(launched))
            return 0
        finished = wait_for(client, launched, timeout=timeout, out=out)
    return summarize(launched, finished=finished, timeout=timeout, git_remote=git_remote, out=out)


def summarize(launched: list[Launched], *, finished: bool, timeout: float | None, git_remote: str,
              out: Callable[[str], Any]) -> int:
    """Print the runs' table and how to see the experiments; 0 when every run completed, else raise (one line)."""
    out(table(launched))
    names = " ".join(item.experiment for item in launched if item.state == "Completed")
    if names:
        out(f"next: dvc exp pull {git_remote} {names} && dvc exp show")
    if not finished:
        going = [item.flow_run_name for item in launched if not item.final]
        raise RuntimeError(f"{len(going)} run(s) not finished after --timeout {timeout:g} s: {', '.join(going)} "
                           "(they go on; follow them in the Prefect UI)")
    failed = [item for item in launched if item.state != "Completed"]
    if failed:
        lines = [line.strip() for line in failed[0].message.splitlines() if line.strip()]
        # the first line names the failed command, the last one is usually its reason (DVC's ERROR: line)
        detail = " ... ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)
        raise RuntimeError(f"{len(failed)} of {len(launched)} run(s) did not complete: "
                           f"{', '.join(f'{i.flow_run_name} ({i.state})' for i in failed)}"
                           f"{f'; {failed[0].flow_run_name}: {detail}' if detail else ''} "
                           "(the Prefect UI has the logs)")
    return 0
