"""What every stage entry module shares: arguments, logging, params, and running its work items.

A stage module in ``stages/`` is thin: ``main(argv)`` calls :func:`start` to read and validate
``params.yaml``, builds a dict of work items, hands them to :func:`run_stage_items` (a Prefect flow that
retries transient failures and places items on GPUs), and writes its outputs through an atomic folder.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.artifacts import Artifacts
from pipeline.config import load_params
from pipeline.io import write_run_info
from pipeline.models.factory import ModelSpec, check_weights_available
from pipeline.orchestration.devices import visible_devices
from pipeline.orchestration.flows import run_items


def start(stage: str, argv: list[str] | None, description: str) -> dict[str, Any]:
    """Parse ``--params``, configure logging, and return the validated params."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=description)
    parser.add_argument("--params", default="params.yaml", type=Path,
                        help="params file to read (default: params.yaml in the current folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(message)s")
    params = load_params(args.params)
    logging.getLogger(__name__).info("stage %s: params from %s", stage, args.params)
    return params


def run_stage_items(stage: str, params: dict[str, Any], items: dict[str, Any],
                    work: Callable[[str, Any, str], Any], *, label: str, on_gpu: bool = True) -> dict[str, Any]:
    """Run ``work(name, item, device)`` for every item in a Prefect flow named after the stage.

    ``on_gpu=False`` is for CPU-only work (image building, sharding): one item at a time on the CPU.
    """
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


def shard_dir(params: dict[str, Any], dataset: str, domain: str) -> Path:
    return Artifacts(params["paths"]).shards(dataset, domain)


def record_run(params: dict[str, Any], stage: str, *, dvc_yaml: str | Path = "dvc.yaml") -> Path:
    """Write ``<paths.run_info>/<stage>.json``: the params keys ``dvc.yaml`` declares for the stage (the ones
    it reads), the execution settings under ``runtime``, and package versions.

    Kept outside the stage's data outputs on purpose: a record that differs between machines must not
    change the hash of what the next stage depends on.
    """
    keys = ["runtime"]
    if Path(dvc_yaml).is_file():
        declared = yaml.safe_load(Path(dvc_yaml).read_text()).get("stages", {}).get(stage, {}).get("params", [])
        keys = [k for k in declared if isinstance(k, str)] + keys
    resolved: dict[str, Any] = {}
    for key in keys:
        node: Any = params
        for part in key.split("."):
            node = node[part]
        resolved[key] = node
    return write_run_info(Artifacts(params["paths"]).run_info(stage), stage=stage, params=resolved)
