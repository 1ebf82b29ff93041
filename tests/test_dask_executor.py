"""``runtime.executor: dask``: a stage's items on a Dask cluster (two local worker processes advertising a fake
``GPU`` resource each), against the ``local`` executor."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("prefect_dask")
from distributed import LocalCluster  # noqa: E402
from prefect.settings import PREFECT_API_URL  # noqa: E402

from pipeline.orchestration.devices import Executor  # noqa: E402
from pipeline.orchestration.flows import StageError, TransientError, run_items  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    # The workers report to the session's Prefect server (tests/conftest.py), one thread each, no GPU seen.
    env = {"PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"GPU": 1}, memory_limit=0,
                      dashboard_address=None, env=env) as local:
        yield local


def train_item(name: str, item: dict, device: str) -> float:
    """A seeded little training run whose weights go to ``<out>/<name>.npy``, with its start and end times."""
    start = time.time()
    torch.manual_seed(item["seed"])
    model = torch.nn.Linear(8, 3)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    for _ in range(20):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimiser.step()
    out = Path(item["out"])
    np.save(out / f"{name}.npy", model.weight.detach().numpy())
    time.sleep(item.get("hold_s", 0.0))  # long enough for items to overlap when they can
    (out / f"{name}.times").write_text(f"{start} {time.time()} {device}")
    if item.get("fail") == "bug":
        raise ValueError(f"item {name}: a deterministic bug")
    if item.get("fail") == "transient":
        attempts = out / f"{name}.attempts"
        attempts.write_text(attempts.read_text() + "x" if attempts.exists() else "x")
        if len(attempts.read_text()) == 1:
            raise TransientError("the first attempt hits a busy resource")
    return float(loss.detach())


def _most_at_once(folder: Path) -> int:
    spans = [tuple(map(float, p.read_text().split()[:2])) for p in folder.glob("*.times")]
    return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)


def _run(items: dict, executor: Executor) -> dict:
    return run_items("dask-test", items, train_item, devices=["cpu"], retries=1, retry_delay_s=0.0,
                     executor=executor)


def test_dask_runs_at_most_one_item_per_gpu_worker_with_the_same_bytes_as_local(cluster, tmp_path):
    outs = {kind: tmp_path / kind for kind in ("local", "dask")}
    results = {}
    for kind, out in outs.items():
        out.mkdir()
        items = {f"item{i}": {"seed": i, "out": str(out), "hold_s": 1.5} for i in range(4)}
        executor = Executor(kind, cluster.scheduler_address if kind == "dask" else None, "cpu")
        results[kind] = _run(items, executor)
    assert results["dask"] == results["local"] and len(results["local"]) == 4
    for i in range(4):
        assert (outs["dask"] / f"item{i}.npy").read_bytes() == (outs["local"] / f"item{i}.npy").read_bytes()
    assert _most_at_once(outs["local"]) == 1  # one CPU slot
    assert _most_at_once(outs["dask"]) == 2   # two workers, one GPU slot each, never more
    assert {p.read_text().split()[2] for p in outs["dask"].glob("*.times")} == {"cpu"}


def test_dask_retries_a_transient_error_and_names_the_item_that_failed_for_good(cluster, tmp_path):
    executor = Executor("dask", cluster.scheduler_address, "cpu")
    ok = _run({"flaky": {"seed": 1, "out": str(tmp_path), "fail": "transient"}}, executor)
    assert set(ok) == {"flaky"} and (tmp_path / "flaky.attempts").read_text() == "xx"
    with pytest.raises(StageError, match=r"stage 'dask-test': 1 item\(s\) failed: broken: ValueError: item broken"):
        _run({"broken": {"seed": 2, "out": str(tmp_path), "fail": "bug"},
              "fine": {"seed": 3, "out": str(tmp_path)}}, executor)


def where_item(name: str, item: dict, device: str) -> str:
    Path("ran-here.txt").write_text(name)  # relative, as stages write their outputs
    return os.getcwd()


def test_dask_items_run_in_the_stages_folder_not_the_workers(cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the workers were started in the repository root
    done = run_items("dask-test", {"a": {}}, where_item, devices=["cpu"], retries=0, retry_delay_s=0.0,
                     executor=Executor("dask", cluster.scheduler_address, "cpu"))
    assert done == {"a": str(tmp_path)} and (tmp_path / "ran-here.txt").read_text() == "a"


def test_a_worker_that_cannot_see_the_project_folder_says_so(tmp_path):
    from pipeline.orchestration.dask import in_folder

    with pytest.raises(FileNotFoundError, match=r"cannot see the project folder .*nowhere: workers need the project "
                       r"on a filesystem they share"):
        with in_folder(str(tmp_path / "nowhere")):
            pass


def test_dask_without_a_prefect_server_says_what_to_do(monkeypatch):
    from prefect.settings import temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        with pytest.raises(RuntimeError, match="runtime.executor: dask needs a Prefect server.*uda-distill server"):
            _run({"a": {"seed": 0, "out": "."}}, Executor("dask", None, "cpu"))


def _stage(project: Path, stage: str) -> None:
    import os
    import subprocess
    import sys

    from pipeline.smoke import smoke_env

    env = {**smoke_env(project), "PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"{stage} in {project}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert os.path.isdir(project)


@pytest.mark.slow
def test_smoke_distill_over_two_seeds_under_dask_matches_local_and_the_report_gives_mean_and_std(
        smoke_project, tmp_path):
    """Seeds 1 and 2 on a local Dask cluster (no address: one worker per GPU, here the CPU); seed 1's runs must
    be byte for byte the smoke project's own, trained by the local executor."""
    import json

    import yaml

    from tests.conftest import copy_project

    dask = copy_project(smoke_project, tmp_path / "dask", light=True)
    params = yaml.safe_load((dask / "params.yaml").read_text())
    assert params["runtime"]["executor"] == "local" and params["seeds"] is None  # how the baseline was trained
    params["seeds"] = [1, 2]
    params["runtime"]["executor"] = "dask"
    (dask / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _stage(dask, "distill")
    tasks = list(params["tasks"])
    local, students = smoke_project / "models" / "students", dask / "models" / "students"
    for task in tasks:
        assert (students / task / "predictions.npy").read_bytes() == (local / task / "predictions.npy").read_bytes()
        logs = [json.loads((d / task / "train_log.json").read_text())["epochs"] for d in (local, students)]
        for epoch in (*logs[0], *logs[1]):
            epoch.pop("seconds")  # wall time: the one value that may differ
        assert logs[0] == logs[1], task
        seeds = [json.loads((students / r / "train_log.json").read_text())["seed"] for r in (task, f"{task}.seed2")]
        assert seeds == [1, 2]
        assert ((students / f"{task}.seed2" / "predictions.npy").read_bytes()
                != (students / task / "predictions.npy").read_bytes())  # another seed, another run
    assert (dask / "results" / "curves" / f"{tasks[0]}.seed2").is_dir()

    for stage in ("evaluate", "report"):
        _stage(dask, stage)
    results = json.loads((dask / "results" / "report" / "results.json").read_text())
    per_seed = {}
    for task in tasks:
        runs = json.loads((dask / "results" / "evaluate" / task / "metrics.json").read_text())["models"]["student"]
        accs = [runs["seeds"][s]["acc"] for s in ("1", "2")]
        per_seed[task] = accs
        assert runs["target"]["last"]["acc"] == accs[0]  # the task's student is the first seed's run
        row = results["tasks"][task]["student"]["target"]
        assert row["acc"] == round(np.mean(accs), 2) and row["acc_std"] == round(float(np.std(accs, ddof=1)), 2)
    benchmark = [np.mean([per_seed[t][i] for t in tasks]) for i in range(2)]
    assert results["mean"]["student"]["target"]["acc_std"] == round(float(np.std(benchmark, ddof=1)), 2)
