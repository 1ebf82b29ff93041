"""Which devices a stage may use, and a pool that hands each item one device at a time."""
from __future__ import annotations

import contextlib
import dataclasses
import queue
from typing import Iterator

import pipeline  # noqa: F401  (environment defaults and the torchvision guard before torch)
import torch

DEVICE_POLICIES = ("auto", "cpu", "cuda")
POLICIES = DEVICE_POLICIES
EXECUTORS = ("local", "dask")


@dataclasses.dataclass(frozen=True)
class Executor:
    """Where a stage's items run: ``runtime.executor`` (``local``: threads of the stage process, one per
    visible GPU; ``dask``: Dask workers, a local cluster or the scheduler at ``runtime.dask_address``) and the
    device policy ``runtime.device`` each item's device follows (on its worker, under Dask)."""

    kind: str = "local"
    dask_address: str | None = None
    device: str = "auto"

    @classmethod
    def from_runtime(cls, runtime: dict) -> "Executor":
        return cls(runtime.get("executor", "local"), runtime.get("dask_address"), runtime.get("device", "auto"))


def visible_devices(policy: str = "auto") -> list[str]:
    """Device ids for `policy`: ``auto`` (every visible GPU, else CPU), ``cpu`` or ``cuda``.

    GPUs are counted through torch, so ``CUDA_VISIBLE_DEVICES`` is respected; never hard-code ids.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown device policy {policy!r}; allowed: {', '.join(POLICIES)}")
    if policy == "cpu":
        return ["cpu"]
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if gpus:
        return gpus
    if policy == "cuda":
        raise RuntimeError(
            "device policy 'cuda' but no GPU is visible "
            "(check CUDA_VISIBLE_DEVICES and that torch is a CUDA build)"
        )
    return ["cpu"]


class DeviceSlots:
    """Thread-safe pool with one slot per entry of `devices`.

    One item per GPU at a time; ``["cpu"]`` has a single slot on purpose, because torch already
    spreads one CPU item over all cores and two would only fight over them.
    """

    def __init__(self, devices: list[str]):
        if not devices:
            raise ValueError("DeviceSlots needs at least one device")
        self.devices = list(devices)
        self._free: queue.Queue[str] = queue.Queue()
        for device in self.devices:
            self._free.put(device)

    @contextlib.contextmanager
    def acquire(self) -> Iterator[str]:
        """Block until a device is free, yield it, and always give it back."""
        device = self._free.get()
        try:
            yield device
        finally:
            self._free.put(device)
