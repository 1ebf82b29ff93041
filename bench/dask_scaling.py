"""The distill stage of the smoke configuration, 2 tasks x 2 seeds (4 items), under ``runtime.executor: local``
and under ``dask`` with 1 and N worker processes, wall time side by side in one run.

    python -m bench.dask_scaling --project SMOKE_PROJECT [--workers 2] [--out bench/results/dask_scaling.json]

SMOKE_PROJECT is a finished ``uda-distill smoke --workdir`` folder (its code is used). Each variant runs in its own
copy of the workspace, as ``python -m stages.distill`` (what ``dvc repro`` runs), reporting to one loopback
Prefect server. Dask variants get a ``LocalCluster`` of single-thread workers advertising ``GPU=1`` each, passed
as ``runtime.dask_address``. On a GPU machine each worker would hold one GPU (``CUDA_VISIBLE_DEVICES``); on a
CPU machine the workers share the cores, so expect little gain there: the figure that matters is 1 -> N GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _copy(project: Path, dst: Path, seeds: list[int], executor: str, address: str | None) -> Path:
    shutil.copytree(project, dst, symlinks=True, ignore=shutil.ignore_patterns(".git", "cache"))
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["seeds"] = seeds
    params["runtime"].update(executor=executor, dask_address=address)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


def _distill(project: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stages.distill"], cwd=project, env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"distill in {project} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from distributed import LocalCluster

    from pipeline.orchestration.local_server import local_server
    from pipeline.smoke import smoke_env

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/dask_scaling.json"))
    args = parser.parse_args(argv)
    seeds, cores = [1, 2], os.cpu_count() or 1
    threads = str(max(1, cores // args.workers))  # every variant's processes together use the cores once
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w") as log, \
            local_server(_free_port(), env={**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect")},
                         output=log) as server:
        env = {**smoke_env(args.project), "PREFECT_API_URL": server.api_url, "OMP_NUM_THREADS": threads}
        times["local"] = _distill(_copy(args.project, Path(tmp) / "local", seeds, "local", None), env)
        for n in sorted({1, args.workers}):
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, resources={"GPU": 1},
                              memory_limit=0, dashboard_address=None,
                              env={"PREFECT_API_URL": server.api_url, "OMP_NUM_THREADS": threads}) as cluster:
                project = _copy(args.project, Path(tmp) / f"dask{n}", seeds, "dask", cluster.scheduler_address)
                times[f"dask_{n}_workers"] = _distill(project, env)
    result = {"items": "2 tasks x 2 seeds", "cores": cores, "omp_threads_per_process": int(threads),
              "seconds": {k: round(v, 1) for k, v in times.items()},
              "ratio_to_local": {k: round(times["local"] / v, 2) for k, v in times.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
