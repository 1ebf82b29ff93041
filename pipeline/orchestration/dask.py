"""``runtime.executor: dask``: a stage's items on Dask workers, through ``prefect-dask``'s ``DaskTaskRunner``.

Only imported in dask mode (the optional extra ``uda-distill[dask]``: ``prefect-dask``, ``distributed``).

* Without ``runtime.dask_address``: a ``LocalCluster`` started for the stage's flow, one worker *process* per
  visible GPU (one thread each, resource ``GPU=1``), worker ``i`` on ``cuda:i``. On one machine with several
  GPUs this is the better mode: items share no GIL. On a machine without GPU it is one CPU worker.
* With ``runtime.dask_address`` (``tcp://host:8786``): the user's scheduler, whose workers are started one
  per GPU, each with its own ``CUDA_VISIBLE_DEVICES`` and ``--resources GPU=1`` (README).

GPU items are submitted under ``dask.annotate(resources={"GPU": 1})`` (an annotation must wrap the submit
call), so a worker runs one at a time; CPU items (sharding, reports) ask for nothing. Workers report their
task runs to the Prefect server at ``PREFECT_API_URL`` (a temporary server per worker process would lose
them). Fail fast across processes goes through a Dask ``Event`` named per stage run.
"""
from __future__ import annotations

import contextlib
import copyreg
import importlib
import os
import socket
from typing import Iterator

import dask
import distributed
import torch
from prefect.settings import PREFECT_API_URL
from prefect_dask import DaskTaskRunner

from pipeline.orchestration.devices import Executor, visible_devices

#: The resource a GPU item asks for and every worker advertises once per GPU.
GPU = "GPU"


def _by_name(module):
    return importlib.import_module, (module.__name__,)


# cloudpickle sends along every imported submodule whose name a pickled function's code mentions, so a work item
# that reads `job.classes` and uses torch carries `torch.classes`; it and `torch.ops` are module *subclasses*,
# which pickle has no rule for. Sent by name, they are the worker's own.
for _module in (torch.classes, torch.ops):
    copyreg.pickle(type(_module), _by_name)


def dask_task_runner(executor: Executor, *, workers: int) -> DaskTaskRunner:
    """The flow's task runner: the scheduler at ``executor.dask_address``, else a local cluster of `workers`
    single-thread worker processes (one per visible GPU), each advertising one GPU."""
    if executor.dask_address:
        return DaskTaskRunner(address=executor.dask_address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True, "resources": {GPU: 1},
        "memory_limit": 0,          # training holds large host buffers on purpose; no pausing or restarts
        "dashboard_address": None,  # no port taken for a dashboard nobody opened
        "env": {"PREFECT_API_URL": PREFECT_API_URL.value()},  # also when it came from a profile, not the shell
    })


@contextlib.contextmanager
def gpu_annotation() -> Iterator[None]:
    """Wrap ``.submit()`` of GPU items: each asks for one ``GPU`` slot of a worker."""
    with dask.annotate(resources={GPU: 1}):
        yield


def worker_device(policy: str) -> str:
    """The device of the worker this runs on: its only visible GPU, or GPU ``i`` for worker ``i`` of a local
    cluster (whose workers see every GPU), or the CPU."""
    devices = visible_devices(policy)
    if len(devices) == 1:
        return devices[0]
    name = distributed.get_worker().name
    if isinstance(name, int) and 0 <= name < len(devices):
        return devices[name]
    raise RuntimeError(f"Dask worker {name!r} sees {len(devices)} GPUs ({', '.join(devices)}) and cannot tell which "
                       "one is its own: start one worker per GPU with CUDA_VISIBLE_DEVICES=<i> (README)")


@contextlib.contextmanager
def in_folder(folder: str) -> Iterator[None]:
    """Run in the stage's project folder: params, shards and outputs are paths relative to it, and a worker
    started elsewhere (``dask worker`` in a home folder, a bench's cluster) would resolve them against its own.
    Safe to change: a worker has one thread."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Dask worker on {socket.gethostname()} cannot see the project folder {folder}: "
                                "workers need the project on a filesystem they share with the stage, at the same "
                                "path (README, Seeds and scaling out)")
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


class WorkerPlacement:
    """Placement of the ``dask`` executor (picklable: it travels with each item to its worker)."""

    def __init__(self, event_name: str, policy: str, on_gpu: bool):
        self.event_name, self.policy, self.on_gpu = event_name, policy, on_gpu
        self.folder = os.getcwd()  # the stage's project folder, where the item must run

    @contextlib.contextmanager
    def device(self) -> Iterator[str]:
        with in_folder(self.folder):
            yield worker_device(self.policy) if self.on_gpu else "cpu"

    def failed(self) -> bool:
        return distributed.Event(self.event_name).is_set()

    def fail(self) -> None:
        distributed.Event(self.event_name).set()
