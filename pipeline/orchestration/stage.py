"""What every stage entry module shares: arguments, logging, params, the stage lock, running its work items.

A stage module in ``stages/`` is thin: ``main(argv)`` calls :func:`start` to read and validate
``params.yaml``, builds a dict of work items, hands them to :func:`run_stage_items` (a Prefect flow that
retries transient failures and places items on GPUs), and writes its outputs through an atomic folder.
``python -m stages.<name>`` runs ``main`` through :func:`pipeline.command.entry`, which turns failures into
one line and an exit status.
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
from pathlib import Path
from typing import Any, Callable

from pipeline.artifacts import Artifacts
from pipeline.command import DEBUG_ENV
from pipeline.config import load_params, resolve_keys, stage_declaration
from pipeline.io import write_run_info
from pipeline.models.factory import LOCAL_DIR, ModelSpec, check_weights_available
from pipeline.orchestration.devices import visible_devices

_STAGE_LOCKS: dict[Path, int] = {}  # lock file -> open descriptor, held until the process exits


def start(stage: str, argv: list[str] | None, description: str, *, per_task: bool = False) -> dict[str, Any]:
    """Parse ``--params``, configure logging, take the stage's lock and return the validated params.

    ``per_task``: the stage runs once per task (a ``foreach`` stage in dvc.yaml) and takes ``--task NAME``;
    the returned params' ``tasks`` hold that task only.
    """
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=description)
    parser.add_argument("--params", default="params.yaml", type=Path,
                        help="params file to read (default: params.yaml in the current folder)")
    if per_task:
        parser.add_argument("--task", required=True, help="the task (a key of params.yaml tasks) to run")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a failure (or set {DEBUG_ENV}=1, e.g. under dvc repro)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(message)s")
    # Once Prefect has configured logging (root at WARNING) basicConfig does nothing: the project's own
    # INFO lines (per-epoch progress, resume decisions) need their level set on the package logger.
    logging.getLogger("pipeline").setLevel(logging.INFO)
    params = load_params(args.params)
    if per_task:
        if args.task not in params["tasks"]:
            raise ValueError(f"--task {args.task!r} is not a task of {args.params} (tasks: {', '.join(params['tasks'])})")
        params["tasks"] = {args.task: params["tasks"][args.task]}
    _lock_stage(stage, Path(params["paths"]["checkpoints"]))
    logging.getLogger(__name__).info("stage %s: params from %s", stage, args.params)
    return params


def _lock_stage(stage: str, checkpoints: Path) -> None:
    """One writer per stage and workspace: a second run of the same stage stops at once, naming the first.

    The lock (``flock``) is released by the kernel when the process ends, however it ends.
    """
    path = checkpoints / ".locks" / f"{stage}.lock"
    if path in _STAGE_LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(f"stage {stage} is already running in this workspace (pid {holder}, lock {path}); "
                           "wait for it to finish or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _STAGE_LOCKS[path] = fd


def run_stage_items(stage: str, params: dict[str, Any], items: dict[str, Any],
                    work: Callable[[str, Any, str], Any], *, label: str, on_gpu: bool = True) -> dict[str, Any]:
    """Run ``work(name, item, device)`` for every item in a Prefect flow named after the stage.

    ``on_gpu=False`` is for CPU-only work (image building, sharding): one item at a time on the CPU.
    """
    # Prefect is imported here, not with this module: stages that run no items (validate, bundle) then start
    # about 4 s sooner, which every `dvc repro` pays.
    from pipeline.orchestration.flows import run_items

    rt = params["runtime"]
    devices = visible_devices(rt["device"]) if on_gpu else ["cpu"]
    return run_items(stage, items, work, devices=devices, retries=rt["retries"],
                     retry_delay_s=rt["retry_delay_s"], run_label=label)


def task_label(params: dict[str, Any]) -> str:
    """Run-name suffix naming the dataset(s) and task(s), e.g. ``digits-usps_to_mnist+printed_to_mnist``."""
    datasets = sorted({t["dataset"] for t in params["tasks"].values()})
    return f"{'+'.join(datasets)}-{'+'.join(params['tasks'])}"


def checked_model_spec(params: dict[str, Any], role: str) -> ModelSpec:
    """The teacher's or student's spec, after checking (before any work) that its weights can be had."""
    spec = ModelSpec.from_params(params["model"][role], role=role, cache_dir=params["model"]["cache_dir"])
    check_weights_available(spec)
    return spec


def standin_architectures(params: dict[str, Any]) -> dict[Path, str]:
    """{folder: architecture} of the ``local-dir:`` models the ``standins`` stage writes (before it has run)."""
    root = Path(params["paths"]["standins"])
    return {root / name: arch for name, arch in params["standins"]["models"].items()}


def check_models(params: dict[str, Any]) -> None:
    """Check that the teacher's and student's weights can be had, except the stand-ins a stage will build."""
    built_here = standin_architectures(params)
    for role in ("teacher", "student"):
        spec = ModelSpec.from_params(params["model"][role], role=role, cache_dir=params["model"]["cache_dir"])
        if not (spec.is_local_dir and spec.local_dir in built_here):
            check_weights_available(spec)


def shard_dir(params: dict[str, Any], dataset: str, domain: str) -> Path:
    return Artifacts(params["paths"]).shards(dataset, domain)


def record_run(params: dict[str, Any], stage: str, *, dvc_yaml: str | Path = "dvc.yaml", record: str | None = None
               ) -> Path:
    """Write ``<paths.run_info>/<record or stage>.json``: the params keys ``dvc.yaml`` declares for the stage
    (the ones it reads), the execution settings under ``runtime``, and package versions.

    Kept outside the stage's data outputs on purpose: a record that differs between machines must not
    change the hash of what the next stage depends on.
    """
    declared = stage_declaration(stage, dvc_yaml).get("params", [])
    resolved = resolve_keys(params, [k for k in declared if isinstance(k, str)] + ["runtime"])
    return write_run_info(Artifacts(params["paths"]).run_info(record or stage), stage=stage, params=resolved)
