"""What every stage entry module shares: arguments, logging, params, the stage lock, running its work items.

A stage module in ``stages/`` is thin: ``main(argv)`` calls :func:`start` to read and validate
``params.yaml``, builds a dict of work items, hands them to :func:`run_stage_items` (a Prefect flow that
retries transient failures and places items on GPUs), and writes its outputs through an atomic folder.
``python -m stages.<name>`` runs ``main`` through :func:`pipeline.command.entry`, which turns failures into
one line and an exit status.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

from pipeline.artifacts import Artifacts
from pipeline.command import DEBUG_ENV
from pipeline.config import load_params, resolve_keys, stage_declaration
from pipeline.schema import ConfigError
from pipeline.io import write_run_info
from pipeline.models.factory import LOCAL_DIR, ModelSpec, check_weights_available
from pipeline.orchestration.devices import Executor, visible_devices

#: Set by ``dvc exp run`` for each stage command: the experiment's name.
DVC_EXP_ENV = "DVC_EXP_NAME"

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
    # The root stays at WARNING: at INFO every library's chatter (httpx logs each of Prefect's API requests)
    # would flood the stage's log. The project's own INFO lines (per-epoch progress, resume decisions) pass
    # through the package logger's level. (Once Prefect has configured logging, basicConfig does nothing.)
    logging.basicConfig(format=f"%(asctime)s {stage} %(levelname)s %(message)s")
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
    """Run ``work(name, item, device)`` for every item as a task of the stage's Prefect flow.

    The flow run is named :func:`flow_run_name`, tagged :func:`flow_run_tags` and shows the params keys the
    stage declares in ``dvc.yaml`` as its parameters. Called inside :func:`run_stage_flow` (a stage that runs
    items in steps), the items are tasks of that flow (whose name, tags and parameters stand).
    ``on_gpu=False`` is for CPU-only work (image building, sharding): one item at a time on the CPU (under
``runtime.executor: dask``, on any worker, without asking for a GPU).
    """
    # Prefect is imported here, not with this module: stages that run no items (validate, bundle) then start
    # about 4 s sooner, which every `dvc repro` pays.
    from pipeline.orchestration.flows import run_items

    rt = params["runtime"]
    devices = visible_devices(rt["device"]) if on_gpu else ["cpu"]
    return run_items(stage, items, work, devices=devices, retries=rt["retries"], retry_delay_s=rt["retry_delay_s"],
                     executor=Executor.from_runtime(rt), on_gpu=on_gpu, **_flow_run_identity(stage, params, label))


def run_stage_flow(stage: str, params: dict[str, Any], body: Callable[[], Any], *, label: str) -> Any:
    """Run ``body()`` as the stage's one Prefect flow, for a stage whose items run in steps (several
    :func:`run_stage_items` calls in `body`, each step's items tasks of this flow)."""
    from pipeline.orchestration.flows import run_in_flow

    devices = visible_devices(params["runtime"]["device"])
    return run_in_flow(stage, body, max_workers=len(devices), executor=Executor.from_runtime(params["runtime"]),
                       **_flow_run_identity(stage, params, label))


def _flow_run_identity(stage: str, params: dict[str, Any], label: str) -> dict[str, Any]:
    return {"run_name": flow_run_name(stage, label), "tags": flow_run_tags(stage, params),
            "parameters": declared_params(params, stage)}


def flow_run_name(stage: str, label: str) -> str:
    """``<stage>-<experiment>-<label>``: the experiment is the name ``dvc exp run`` gives the run (it sets
    ``DVC_EXP_NAME`` for the stage commands), left out under ``dvc repro`` or a direct run."""
    return "-".join(part for part in (stage, os.environ.get(DVC_EXP_ENV, ""), label) if part)


def flow_run_tags(stage: str, params: dict[str, Any]) -> list[str]:
    """``stage:``, ``method:``, ``dataset:``, ``task:``, ``exp:`` (under ``dvc exp run``) and ``git:`` (the
    revision, ``+dirty`` with uncommitted changes; none outside a git repository) tags of the stage's runs."""
    datasets = sorted({t["dataset"] for t in params["tasks"].values()})
    tags = [f"stage:{stage}", f"method:{params['distill']['method']}", *(f"dataset:{d}" for d in datasets),
            *(f"task:{t}" for t in params["tasks"])]
    if os.environ.get(DVC_EXP_ENV):
        tags.append(f"exp:{os.environ[DVC_EXP_ENV]}")
    revision = git_revision()
    return tags + [f"git:{revision}"] if revision else tags


def git_revision(cwd: str | Path = ".") -> str | None:
    """The short commit of the repository at `cwd`, with ``+dirty`` when tracked files other than ``dvc.lock``
    differ from it (DVC rewrites dvc.lock after every stage of a repro: that is no change of the code or
    params); None outside a git repository or without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=30)
        if head.returncode != 0:
            return None
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)dvc.lock"], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if changes.stdout.strip() else "")


def declared_params(params: dict[str, Any], stage: str, dvc_yaml: str | Path = "dvc.yaml") -> dict[str, Any]:
    """The params keys ``dvc.yaml`` declares for the stage (the ones it reads) and ``runtime``, as
    ``{"a.b": value}``: what a stage's run record and its Prefect flow run show."""
    declared = stage_declaration(stage, dvc_yaml).get("params", [])
    return resolve_keys(params, [k for k in declared if isinstance(k, str)] + ["runtime"])


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


def architecture_params(params: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` naming each stand-in ``local-dir:`` model by its architecture, so that the models
    can be built on the meta device before the ``standins`` stage has run."""
    out = copy.deepcopy(params)
    built_here = standin_architectures(params)
    for role in ("teacher", "student"):
        name = out["model"][role]["name"]
        if name.startswith(LOCAL_DIR) and Path(name[len(LOCAL_DIR):]) in built_here:
            out["model"][role]["name"] = built_here[Path(name[len(LOCAL_DIR):])]
    return out


def check_architectures(params: dict[str, Any]) -> None:
    """Build the teacher's source prompts and the method's models on the meta device (no weights, about a
    second): a prompt depth beyond a model's layers, say, stops the run here, before any data stage."""
    from pipeline.methods.param_counts import method_parameter_counts, source_prompt_row

    p = architecture_params(params)
    try:
        source_prompt_row(p, 10)
        method_parameter_counts(p)
    except ValueError as exc:
        kind, method = p["prompts"]["kind"], p["distill"]["method"]
        raise ConfigError(f"prompts.{kind} or distill.{method} does not fit the models (teacher "
                          f"{p['model']['teacher']['name']}, student {p['model']['student']['name']}): {exc}") from None


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
    return write_run_info(Artifacts(params["paths"]).run_info(record or stage), stage=stage,
                          params=declared_params(params, stage, dvc_yaml))
