"""``uda-distill smoke``: the README's main command (``dvc repro`` on the default, offline ``params.yaml``)
in a scratch copy of the project, as a fresh clone would run it.

The copy holds the project's files as git sees them (tracked and not ignored; a fixed list outside a git
checkout), is its own git repository (so ``dvc exp run`` works there at once), and after the run commits
``dvc.lock`` and the metrics, so ``dvc exp show`` and ``dvc metrics diff`` have a baseline. Running it again
on the same folder re-runs ``dvc repro`` there (DVC runs what changed). The user's workspace, caches and DVC
lock are never touched. Prefect runs go to the server named by ``PREFECT_API_URL`` when it is set (e.g. by
``uda-distill server``), else to a temporary server per stage whose database lives in the copy.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

#: What a copy holds when the project is not a git checkout (e.g. an unpacked archive).
PROJECT_FILES = ("pipeline", "stages", "configs", "params.yaml", "dvc.yaml", ".dvcignore", ".dvc/config",
                 ".dvc/.gitignore", ".gitignore", "pyproject.toml", "README.md")
#: Written into every copy: a folder holding it is a smoke project that `smoke` may run again.
MARKER = ".uda-distill-smoke"
LOG = "smoke.log"


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def prefect_target() -> str:
    """Where the smoke run's Prefect runs go, in words."""
    url = os.environ.get("PREFECT_API_URL")
    return f"the Prefect server at {url}" if url else "a temporary Prefect server per stage (set PREFECT_API_URL to keep them)"


def smoke_env(workdir: Path) -> dict[str, str]:
    """Offline, telemetry-free environment for the pipeline's subprocesses."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"})
    if not env.get("PREFECT_API_URL"):  # temporary servers keep their database in the copy, not in ~/.prefect
        env["PREFECT_HOME"] = str(workdir / ".prefect")
    # stage commands say `python -m ...`: make that this interpreter even when its venv is not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path | None = None, echo: bool = False) -> str:
    """Run ``cmd``; return its combined output (appended to ``log``, streamed when ``echo``).

    Raises with the tail of the output when the command fails.
    """
    lines = []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        with open(log if log is not None else os.devnull, "a", encoding="utf-8") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            for line in proc.stdout:
                lines.append(line)
                fh.write(line)
                if echo:
                    sys.stdout.write(line)
    output = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}):\n{output[-4000:]}")
    return output


def _project_files(source: Path) -> list[str]:
    """The files a fresh clone of ``source`` would hold (tracked, plus new files git does not ignore)."""
    if (source / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=source,
                                check=True, capture_output=True).stdout.decode().split("\0")
        return [name for name in listed if name and (source / name).is_file()]  # not files deleted in the tree
    return [str(p.relative_to(source)) for name in PROJECT_FILES for p in
            ([source / name] if (source / name).is_file() else sorted((source / name).rglob("*")))
            if p.is_file() and "__pycache__" not in p.parts]


def _git(args: list[str], workdir: Path) -> str:
    return run(["git", *args], cwd=workdir, env=smoke_env(workdir))


def prepare_workdir(workdir: str | os.PathLike, *, source: Path | None = None) -> Path:
    """Copy the project into ``workdir`` as a fresh git repository; a folder made by an earlier smoke run is
    returned as it is (its code is that earlier copy)."""
    source, workdir = source or project_root(), Path(workdir)
    if (workdir / MARKER).is_file():
        return workdir
    if workdir.exists() and any(workdir.iterdir()):
        raise FileExistsError(f"smoke folder {workdir} is not empty and was not made by `uda-distill smoke` "
                              f"(no {MARKER} in it); pass a new or empty folder, or the folder of an earlier smoke run")
    for name in _project_files(source):
        dst = workdir / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, dst)
    (workdir / MARKER).write_text(f"a scratch copy of {source} made by `uda-distill smoke`\n", encoding="utf-8")
    _git(["init", "-q"], workdir)
    # a local identity: `dvc exp run` commits experiments, and CI machines may have no global one
    _git(["config", "user.name", "uda-distill smoke"], workdir)
    _git(["config", "user.email", "smoke@localhost"], workdir)
    with open(workdir / ".git" / "info" / "exclude", "a", encoding="utf-8") as fh:
        fh.write(f"{LOG}\n")
    _git(["add", "-A"], workdir)
    _git(["commit", "-q", "-m", "uda-distill project (scratch copy)"], workdir)
    return workdir


def dvc(args: list[str], *, workdir: Path, echo: bool = False) -> str:
    """Run a ``dvc`` command in the scratch project with the smoke environment (logged to smoke.log)."""
    return run([sys.executable, "-m", "dvc", *args], cwd=workdir, env=smoke_env(workdir),
               log=workdir / LOG, echo=echo)


def commit_results(workdir: Path, message: str = "smoke run: dvc.lock and metrics") -> bool:
    """Commit what ``dvc repro`` leaves for git (``dvc.lock``, metrics, DVC's .gitignore entries); False when
    nothing changed."""
    _git(["add", "-A"], workdir)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=workdir).returncode == 0:
        return False
    _git(["commit", "-q", "-m", message], workdir)
    return True


def run_smoke(workdir: str | os.PathLike, *, echo: bool = False) -> Path:
    """Prepare (or reuse) ``workdir``, run ``dvc repro`` there and commit the result; return the results folder."""
    workdir = prepare_workdir(workdir)
    dvc(["repro"], workdir=workdir, echo=echo)
    commit_results(workdir)
    params = yaml.safe_load((workdir / "params.yaml").read_text(encoding="utf-8"))
    return workdir / params["paths"]["report"]
