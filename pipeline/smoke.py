"""Run the real pipeline (``dvc repro``) on the smoke configuration in a scratch copy of the project.

The copy keeps the default (offline) ``params.yaml`` and gets its own git repository (so that ``dvc exp run``
also works there, as the tests check) and its own Prefect home, so the user's workspace, caches and DVC lock are never touched.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_FILES = ("pipeline", "stages", "configs", "params.yaml", "dvc.yaml", ".dvcignore", ".dvc/config",
                 ".dvc/.gitignore", "pyproject.toml")


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def smoke_env(workdir: Path) -> dict[str, str]:
    """Offline, telemetry-free environment for the pipeline's subprocesses."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(workdir / ".prefect"),
                "PYTHONUNBUFFERED": "1"})
    env.pop("PREFECT_API_URL", None)  # ephemeral: never report smoke runs into a user's server
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


def prepare_workdir(workdir: str | os.PathLike, *, source: Path | None = None) -> Path:
    """Copy the project into ``workdir`` with the smoke params, as a fresh git repository."""
    source, workdir = source or project_root(), Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        raise FileExistsError(f"smoke workdir {workdir} is not empty; pass a new folder")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src, dst = source / name, workdir / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    env = smoke_env(workdir)
    run(["git", "init", "-q"], cwd=workdir, env=env)
    # a local identity: `dvc exp run` commits experiments, and CI machines may have no global one
    run(["git", "config", "user.name", "uda-distill smoke"], cwd=workdir, env=env)
    run(["git", "config", "user.email", "smoke@localhost"], cwd=workdir, env=env)
    run(["git", "add", "-A"], cwd=workdir, env=env)
    run(["git", "commit", "-q", "-m", "smoke configuration"], cwd=workdir, env=env)
    return workdir


def dvc(args: list[str], *, workdir: Path, echo: bool = False) -> str:
    """Run a ``dvc`` command in the scratch project with the smoke environment (logged to smoke.log)."""
    return run([sys.executable, "-m", "dvc", *args], cwd=workdir, env=smoke_env(workdir),
               log=workdir / "smoke.log", echo=echo)


def run_smoke(workdir: str | os.PathLike, *, echo: bool = False) -> Path:
    """Prepare ``workdir`` and run ``dvc repro`` there; return the results folder."""
    workdir = prepare_workdir(workdir)
    dvc(["repro"], workdir=workdir, echo=echo)
    return workdir / "results" / "report"
