"""Seeded calls of random image transforms: the same augmented view for a (seed, epoch, sample, view) on
every run, whatever the loader's order, worker count or other threads.

The transforms of :mod:`pipeline.data.transforms` draw from torch's default CPU generator (torchvision) and
from the ``random`` and ``np.random`` that timm's RandAugment module calls. :func:`seeded_call` seeds the first
and gives timm's module private generators for the call; a new transform must draw from one of the two.
"""
from __future__ import annotations

import hashlib
import random
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch

# torch's default CPU generator is process-wide and stage items run in threads of one process: one seeded
# call at a time. timm's draws are made private (below) so other threads' use of the global ``random``
# (Prefect's background workers jitter their retries with it) cannot change a view.
_SEEDED_LOCK = threading.Lock()
_AUGMENT_TAG = 0x61756720  # "aug ": keeps these seeds apart from the shuffle's (seed, epoch, worker) streams


def view_seed(seed: int, epoch: int, key: str, view: int) -> np.random.SeedSequence:
    """The seed of one (sample, view) draw: a function of (seed, epoch, sample key, view index) only, so
    neither the loader's order nor its worker count changes an augmented image."""
    key_int = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:16], "little")
    return np.random.SeedSequence([_AUGMENT_TAG, seed, epoch, view, key_int])


class _NumpyWithGenerator:
    """``numpy`` as timm's auto_augment module sees it, except that ``np.random`` is a private RandomState."""

    def __init__(self, generator: np.random.RandomState):
        self.random = generator

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


@contextmanager
def _private_timm_generators(py_seed: int, np_seed: np.ndarray) -> Iterator[None]:
    # timm's RandAugment calls the module-level ``random`` and ``np.random`` of timm.data.auto_augment; both
    # names are rebound there (and only there) for the call. Seeded the same way as ``random.seed`` /
    # ``np.random.seed`` would be, so the draws equal those from freshly seeded global generators.
    module = sys.modules.get("timm.data.auto_augment")
    if module is None:  # not imported, so no transform can be using it
        yield
        return
    saved = module.random, module.np
    module.random = random.Random(py_seed)
    module.np = _NumpyWithGenerator(np.random.RandomState(np_seed))
    try:
        yield
    finally:
        module.random, module.np = saved


def seeded_call(transform: Callable, image: Any, seed: np.random.SeedSequence, *,
                restore: bool = True) -> Any:
    """``transform(image)`` with torch's default CPU generator and timm's RandAugment generators seeded from
    ``seed``, under a process-wide lock. Only the CPU generator is touched (``torch.manual_seed`` would
    reseed every CUDA device too); Python's and NumPy's global generators are not touched at all.

    ``restore=True`` puts torch's generator back as it was afterwards, so a caller's own random stream does
    not depend on whether the loader ran in its process. Loader workers pass False: nothing else draws there.

    Reproducible as long as no other thread draws from torch's default CPU generator while a transform
    runs (on CPU a stage runs one item at a time; loader workers are separate processes).
    """
    words = seed.generate_state(3, dtype=np.uint64)
    with _SEEDED_LOCK, _private_timm_generators(int(words[0]), words[1:2].view(np.uint32)):
        saved = torch.default_generator.get_state() if restore else None
        try:
            torch.default_generator.manual_seed(int(words[2]))
            return transform(image)
        finally:
            if saved is not None:
                torch.default_generator.set_state(saved)
